"""The training loop: pivotal tuning (textual inversion, then LoRA) or DreamBooth-LoRA.

Follows cloneofsimo/lora's ``lora_pti``:

- Phase 1 (textual inversion): only the rows of the new tokens learn; every other row is restored
  after each optimizer step. With ``clip_ti_decay`` each new embedding's norm is pulled toward
  0.4 with strength min(1, 100 * lr). Timesteps are drawn from the first 80% of the schedule, and
  gradients accumulate over ``gradient_accumulation_steps`` micro-steps.
- Phase 2 (tuning): peft LoRA on the UNet (and the text encoder with ``train_text_encoder``),
  one learning rate per group, optional continued inversion, gradient clipping, all timesteps.

A step is one micro-batch, as in lora_pti. The loss is the MSE to the noise, or to the velocity
for v-prediction models. accelerate handles the device, mixed precision and data parallelism.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from loraforge_core.bundle import Bundle, Manifest, store_bundle
from loraforge_core.models import resolve_model
from trainer_service.config import TrainingConfig
from trainer_service.training import lora
from trainer_service.training.data import (
    InstanceExample,
    caption_for,
    color_jitter,
    to_tensor,
)
from trainer_service.training.events import NullReporter, Reporter

log = logging.getLogger("loraforge.training")

CLIP_TI_TARGET_NORM = 0.4
INVERSION_TIMESTEP_FRACTION = 0.8
CHECKPOINT_GLOB = "step-*.pt"


class StopRequested(Exception):
    """Raised between steps when the job was cancelled."""


@dataclass
class RunPaths:
    checkpoints: Path  # training state, for resume
    artifacts: Path  # the artifact store (bundles)


def _step_generator(seed: int, rank: int, step: int, salt: str = "") -> torch.Generator:
    """A generator per (seed, rank, step): a resumed run draws exactly what it would have."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Trainer:
    """One training run of ``config`` on ``examples``; ``run()`` returns the final bundle."""

    def __init__(
        self,
        config: TrainingConfig,
        examples: list[InstanceExample],
        paths: RunPaths,
        reporter: Reporter | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        if not examples:
            raise ValueError("no instance images")
        self.config = config
        self.examples = examples
        self.paths = paths
        self.reporter = reporter or NullReporter()
        self.should_stop = should_stop
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            cpu=config.device == "cpu",
        )
        self.rank = self.accelerator.process_index
        self.global_step = 0
        self._step_times: list[float] = []

    # ---------------------------------------------------------------- reporting
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def emit(self, kind: str, **fields: Any) -> None:
        if self.is_main:
            self.reporter.emit(kind, **fields)

    # ---------------------------------------------------------------- set-up
    def _load_models(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.model_path = resolve_model(self.config.pretrained_model_name_or_path)
        model = self.model_path
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
        self.resolution = self.config.resolution or int(self.vae.config.sample_size)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        device = self.accelerator.device
        self.vae.to(device, dtype=torch.float32)
        self.unet.to(device, dtype=self.weight_dtype)
        self.text_encoder.to(device)
        if self.config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.text_encoder.gradient_checkpointing_enable()

    def _add_tokens(self) -> None:
        """Add the placeholder tokens and initialise their embedding rows."""
        tokens = self.config.learned_tokens
        self.token_ids: list[int] = []
        if not tokens:
            return
        added = self.tokenizer.add_tokens(tokens)
        if added != len(tokens):
            raise ValueError(f"placeholder tokens {tokens} already exist in the tokenizer")
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.token_ids = self.tokenizer.convert_tokens_to_ids(tokens)
        embeddings = self.text_encoder.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for token_id, init in zip(self.token_ids, self.config.initializers(), strict=True):
                embeddings[token_id] = self._initial_embedding(init, embeddings, generator)
        self.original_embeddings = embeddings.detach().clone()
        self.keep_rows = torch.ones(len(self.tokenizer), dtype=torch.bool)
        self.keep_rows[self.token_ids] = False

    def _initial_embedding(
        self, init: str, embeddings: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        dim = embeddings.shape[1]
        if init == "<zero>":
            return torch.zeros(dim)
        if init.startswith("<rand-"):
            std = float(init[len("<rand-") : -1])
            return torch.randn(dim, generator=generator).to(embeddings) * std
        ids = self.tokenizer(init, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"initializer {init!r} is {len(ids)} tokens in this tokenizer; use one token"
            )
        return embeddings[ids[0]].detach().clone()

    def _prepare_data(self) -> None:
        """Pixels per image (and its mirror); with cached latents, their VAE posteriors."""
        pixels = [to_tensor(e.image, self.resolution) for e in self.examples]
        if self.config.random_flip:
            pixels += [p.flip(-1) for p in pixels]
        self.pixels = torch.stack(pixels)
        self.latent_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.config.cached_latents:
            with torch.no_grad():
                dist = self.vae.encode(self.pixels.to(self.accelerator.device)).latent_dist
            self.latent_cache = (dist.mean, dist.std)
        self.class_pixels: torch.Tensor | None = None
        if self.config.method == "dreambooth_lora" and self.config.with_prior_preservation:
            self.class_pixels = self._generate_class_images()

    def _generate_class_images(self) -> torch.Tensor:
        """Prior-preservation images of the class prompt, drawn by the base model."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            self.model_path, safety_checker=None, requires_safety_checker=False
        ).to(self.accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        self.emit(
            "log", level="info", message=f"generating {self.config.num_class_images} class images"
        )
        images = []
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.config.num_class_images):
            image = pipe(
                self.config.class_prompt,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=25,
                generator=generator,
            ).images[0]
            images.append(to_tensor(image, self.resolution))
        del pipe
        return torch.stack(images)

    # ---------------------------------------------------------------- batches and loss
    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Latents and captions for one micro-batch."""
        size = self.config.train_batch_size
        index = torch.randint(0, len(self.pixels), (size,), generator=generator)
        n_images = len(self.examples)
        rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
        fallback = self.config.instance_prompt if self.config.method != "pti" else ""
        captions = [self._caption(self.examples[int(i) % n_images], rng, fallback) for i in index]
        dropout = self.config.caption_dropout
        captions = [c if dropout == 0 or rng.random() >= dropout else "" for c in captions]
        device = self.accelerator.device
        if self.latent_cache is not None:
            mean, std = self.latent_cache
            eps = torch.randn(mean[index].shape, generator=generator).to(device)
            latents = mean[index] + std[index] * eps
        else:
            pixels = self.pixels[index]
            if self.config.color_jitter:
                pixels = torch.stack([color_jitter(p, generator) for p in pixels])
            with torch.no_grad():
                latents = self.vae.encode(pixels.to(device)).latent_dist.sample(generator=None)
        return latents * self.vae.config.scaling_factor, captions

    def _caption(self, example: InstanceExample, rng: random.Random, fallback: str) -> str:
        if self.config.method == "pti":
            return caption_for(example, self.config.use_template, self.config.learned_tokens, rng)
        return example.caption or fallback

    def _class_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        assert self.class_pixels is not None
        size = self.config.train_batch_size
        index = torch.randint(0, len(self.class_pixels), (size,), generator=generator)
        with torch.no_grad():
            dist = self.vae.encode(self.class_pixels[index].to(self.accelerator.device))
        return dist.latent_dist.mean * self.vae.config.scaling_factor, [
            self.config.class_prompt
        ] * size

    def _encode_prompts(self, text_encoder: torch.nn.Module, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions, padding="max_length", truncation=True,
            max_length=self.tokenizer.model_max_length, return_tensors="pt",
        ).input_ids.to(self.accelerator.device)  # fmt: skip
        return text_encoder(ids)[0]

    def _loss(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        latents: torch.Tensor,
        captions: list[str],
        generator: torch.Generator,
        t_fraction: float,
    ) -> torch.Tensor:
        """Denoising loss: MSE to the noise (epsilon) or to the velocity (v-prediction)."""
        device = self.accelerator.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t_max = max(1, int(self.noise_scheduler.config.num_train_timesteps * t_fraction))
        timesteps = torch.randint(0, t_max, (latents.shape[0],), generator=generator).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():
            hidden = self._encode_prompts(text_encoder, captions)
            prediction = unet(noisy.to(self.weight_dtype), timesteps, hidden).sample
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"prediction type {kind!r} is not supported for training")
        return F.mse_loss(prediction.float(), target.float())

    def _step_loss(
        self, unet: torch.nn.Module, text_encoder: torch.nn.Module, t_fraction: float
    ) -> torch.Tensor:
        generator = _step_generator(self.seed, self.rank, self.global_step)
        latents, captions = self._batch(generator)
        loss = self._loss(unet, text_encoder, latents, captions, generator, t_fraction)
        if self.class_pixels is not None:
            class_latents, class_captions = self._class_batch(generator)
            prior = self._loss(
                unet, text_encoder, class_latents, class_captions, generator, t_fraction
            )
            loss = loss + self.config.prior_loss_weight * prior
        return loss

    # ---------------------------------------------------------------- embeddings
    def _embedding_weight(self) -> torch.Tensor:
        return self.accelerator.unwrap_model(self.text_encoder).get_input_embeddings().weight

    @torch.no_grad()
    def _after_embedding_step(self, lr: float) -> None:
        """Restore every row but the new tokens'; pull their norms toward 0.4 (clip_ti_decay)."""
        weight = self._embedding_weight()
        if self.config.clip_ti_decay:
            rows = weight[self.token_ids]
            norm = rows.norm(dim=-1, keepdim=True)
            strength = min(1.0, 100 * lr)
            weight[self.token_ids] = F.normalize(rows, dim=-1) * (
                norm + strength * (CLIP_TI_TARGET_NORM - norm)
            )
        keep = self.keep_rows.to(weight.device)
        weight[keep] = self.original_embeddings.to(weight)[keep]

    def learned_embeddings(self) -> dict[str, torch.Tensor]:
        weight = self._embedding_weight().detach().float().cpu()
        return {
            token: weight[token_id].clone()
            for token, token_id in zip(self.config.learned_tokens, self.token_ids, strict=True)
        }

    # ---------------------------------------------------------------- optimisation helpers
    def _lr(self, base: float) -> float:
        if not self.config.scale_lr:
            return base
        accumulation = self.config.gradient_accumulation_steps
        return base * accumulation * self.config.train_batch_size * self.accelerator.num_processes

    def _scheduler(self, optimizer: torch.optim.Optimizer, steps: int) -> Any:
        """The configured schedule over ``steps`` optimizer steps.

        accelerate advances a prepared scheduler once per process on every step, so the
        schedule is stretched by the process count (as diffusers' training scripts do).
        """
        from diffusers.optimization import get_scheduler

        processes = self.accelerator.num_processes
        return get_scheduler(
            self.config.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=self.config.lr_warmup_steps * processes,
            num_training_steps=max(steps, 1) * processes,
        )  # fmt: skip

    def _progress(
        self, phase: str, step: int, total: int, loss: float, lr: float, started: float
    ) -> None:
        now = time.monotonic()
        self._step_times.append(now)
        window = self._step_times[-20:]
        rate = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else 0.0
        if rate == 0.0 and now > started:
            rate = 1.0 / (now - started)
        remaining = self.config.total_steps - self.global_step
        self.emit(
            "progress", phase=phase, step=step, total_steps=total, loss=loss, lr=lr,
            steps_per_second=rate, eta_seconds=remaining / rate if rate else 0.0,
            global_step=self.global_step,
        )  # fmt: skip

    def _check_stop(self) -> None:
        if self.should_stop():
            raise StopRequested()

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_path(self, step: int) -> Path:
        return self.paths.checkpoints / f"step-{step:07d}.pt"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.paths.checkpoints.glob(CHECKPOINT_GLOB))
        return found[-1] if found else None

    def _save_state(self, phase: str, optimizer: Any, scheduler: Any) -> None:
        """Training state (atomic) and a bundle artifact of the weights so far."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "global_step": self.global_step,
                "phase": phase,
                "seed": self.seed,
                "embeddings": self._embedding_weight()[self.token_ids].detach().cpu().clone()
                if self.token_ids
                else torch.zeros(0),
                "unet_lora": self._unet_lora_state(),
                "text_lora": self._text_lora_state(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
            final = self._checkpoint_path(self.global_step)
            tmp = final.with_suffix(".tmp")
            torch.save(state, tmp)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            bundle = self.export_bundle()
            self.emit(
                "checkpoint",
                global_step=self.global_step,
                bundle=str(bundle.path),
                artifact_id=bundle.id,
            )
        self.accelerator.wait_for_everyone()

    def _load_state(self, path: Path) -> dict[str, Any]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.global_step = int(state["global_step"])
        self.seed = int(state["seed"])
        if self.token_ids:
            with torch.no_grad():
                self._embedding_weight()[self.token_ids] = state["embeddings"].to(
                    self._embedding_weight()
                )
        torch.set_rng_state(state["torch_rng"])
        return state

    def _unet_lora_state(self) -> dict[str, torch.Tensor]:
        unet = self.accelerator.unwrap_model(self.unet)
        return lora.peft_state(unet) if getattr(unet, "peft_config", None) else {}

    def _text_lora_state(self) -> dict[str, torch.Tensor]:
        encoder = self.accelerator.unwrap_model(self.text_encoder)
        return lora.peft_state(encoder) if getattr(encoder, "peft_config", None) else {}

    def export_bundle(self) -> Bundle:
        config = self.config
        manifest = Manifest(
            base_model=config.pretrained_model_name_or_path or "loraforge/tiny",
            method=config.method,
            tokens=config.learned_tokens,
            rank=config.lora_rank,
            alpha=float(config.lora_rank),  # folded into the weights: see lora.py
            unet_target_modules=list(config.lora_unet_target_modules),
            text_encoder_target_modules=list(config.lora_clip_target_modules)
            if config.train_text_encoder else [],
            global_step=self.global_step,
            text_hidden_size=int(self.accelerator.unwrap_model(self.text_encoder).config.hidden_size),
            cross_attention_dim=int(self.accelerator.unwrap_model(self.unet).config.cross_attention_dim),
            training_config={**config.to_dict(), "seed": self.seed,
                             "trained_alpha": config.effective_alpha},
        )  # fmt: skip
        lora_state = lora.diffusers_lora_state(
            self._unet_lora_state(), self._text_lora_state(), config.lora_rank,
            config.effective_alpha,
        )  # fmt: skip
        return store_bundle(self.paths.artifacts, lora_state, self.learned_embeddings(), manifest)

    # ---------------------------------------------------------------- previews
    @torch.no_grad()
    def _maybe_preview(self) -> None:
        config = self.config
        every = config.validation_steps or config.save_steps
        if not config.validation_prompt or self.global_step % every or not self.is_main:
            return
        import io

        from diffusers import DDIMScheduler, StableDiffusionPipeline

        unet = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=text_encoder, tokenizer=self.tokenizer, unet=unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training, text_encoder.training
        unet.eval()
        text_encoder.eval()
        image = pipe(
            config.validation_prompt,
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=20,
            generator=torch.Generator().manual_seed(self.seed),
        ).images[0]
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        self.emit(
            "preview",
            global_step=self.global_step,
            prompt=config.validation_prompt,
            png=buffer.getvalue(),
            width=image.width,
            height=image.height,
        )

    def _after_step(self, phase: str, optimizer: Any, scheduler: Any) -> None:
        if self.global_step % self.config.save_steps == 0:
            self._save_state(phase, optimizer, scheduler)
        self._maybe_preview()

    # ---------------------------------------------------------------- phases
    def _run_inversion(self, resume_state: dict[str, Any] | None) -> None:
        config = self.config
        steps = config.inversion_steps
        if steps == 0 or self.global_step >= steps:
            return
        embedding = self.text_encoder.get_input_embeddings().weight
        embedding.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [embedding], lr=self._lr(config.learning_rate_ti), weight_decay=config.weight_decay_ti
        )
        accumulation = config.gradient_accumulation_steps
        # The schedule counts optimizer steps (one per accumulation window).
        scheduler = self._scheduler(optimizer, math.ceil(steps / accumulation))
        text_encoder, optimizer, scheduler = self.accelerator.prepare(
            self.text_encoder, optimizer, scheduler
        )
        if resume_state is not None and resume_state["phase"] == "inversion":
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["lr_scheduler"])
        self.text_encoder = text_encoder
        text_encoder.train()
        started = time.monotonic()
        self.emit("phase", phase="inversion", total_steps=steps)
        while self.global_step < steps:
            self._check_stop()
            self.global_step += 1
            loss = self._step_loss(self.unet, text_encoder, INVERSION_TIMESTEP_FRACTION)
            self.accelerator.backward(loss / accumulation)
            lr = scheduler.get_last_lr()[0]
            if self.global_step % accumulation == 0 or self.global_step == steps:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self._after_embedding_step(lr)
                scheduler.step()
            self._progress("inversion", self.global_step, steps, loss.item(), lr, started)
            self._after_step("inversion", optimizer, scheduler)
        embedding.requires_grad_(False)
        self.text_encoder = self.accelerator.unwrap_model(text_encoder)
        self.accelerator.free_memory()

    def _run_tuning(self, resume_state: dict[str, Any] | None) -> None:
        config = self.config
        offset = config.inversion_steps
        steps = config.max_train_steps_tuning
        unet = self.accelerator.unwrap_model(self.unet)
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        lora.add_unet_lora(unet, lora.lora_config(
            config.lora_rank, config.effective_alpha, config.lora_unet_target_modules,
            config.lora_dropout,
        ))  # fmt: skip
        if config.train_text_encoder:
            lora.add_text_encoder_lora(text_encoder, lora.lora_config(
                config.lora_rank, config.effective_alpha, config.lora_clip_target_modules,
                config.lora_dropout,
            ))  # fmt: skip
        if resume_state is not None and resume_state["phase"] == "tuning":
            lora.load_peft_state(unet, resume_state["unet_lora"])
            if config.train_text_encoder:
                lora.load_peft_state(text_encoder, resume_state["text_lora"])
        # LoRA weights train in fp32 whatever the frozen weights' dtype.
        for param in lora.lora_parameters(unet) + lora.lora_parameters(text_encoder):
            param.data = param.data.float()
        groups = [{"params": lora.lora_parameters(unet), "lr": self._lr(config.learning_rate_unet)}]
        if config.train_text_encoder:
            groups.append(
                {
                    "params": lora.lora_parameters(text_encoder),
                    "lr": self._lr(config.learning_rate_text),
                }
            )
        invert = config.continue_inversion and bool(self.token_ids)
        if invert:
            embedding = text_encoder.get_input_embeddings().weight
            embedding.requires_grad_(True)
            lr_ti = config.continue_inversion_lr or config.learning_rate_ti
            groups.append({"params": [embedding], "lr": self._lr(lr_ti)})
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay_lora)
        scheduler = self._scheduler(optimizer, steps)
        trains_text = config.train_text_encoder or invert
        if trains_text:
            unet, text_encoder, optimizer, scheduler = self.accelerator.prepare(
                unet, text_encoder, optimizer, scheduler
            )
        else:
            unet, optimizer, scheduler = self.accelerator.prepare(unet, optimizer, scheduler)
        if resume_state is not None and resume_state["phase"] == "tuning":
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["lr_scheduler"])
        self.unet, self.text_encoder = unet, text_encoder
        unet.train()
        text_encoder.train(trains_text)
        params = [p for group in groups for p in group["params"]]
        started = time.monotonic()
        self.emit("phase", phase="tuning", total_steps=steps)
        while self.global_step < offset + steps:
            self._check_stop()
            self.global_step += 1
            loss = self._step_loss(unet, text_encoder, 1.0)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(params, config.max_grad_norm)
            lrs = scheduler.get_last_lr()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if invert:
                self._after_embedding_step(lrs[-1])
            self._progress("tuning", self.global_step - offset, steps, loss.item(), lrs[0], started)
            self._after_step("tuning", optimizer, scheduler)

    # ---------------------------------------------------------------- entry point
    def run(self, resume: bool = True) -> Bundle | None:
        """Train (resuming from the latest checkpoint when there is one); return the bundle.

        Ranks other than the main process return None.
        """
        self.emit("phase", phase="preparing", total_steps=self.config.total_steps)
        self._load_models()
        self._add_tokens()
        self._prepare_data()
        resume_state = None
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None:
            resume_state = self._load_state(checkpoint)
            self.emit(
                "log", level="info", message=f"resumed from checkpoint at step {self.global_step}"
            )
        if resume_state is not None and resume_state["phase"] == "tuning":
            self._run_tuning(resume_state)
        else:
            self._run_inversion(resume_state)
            self._run_tuning(None)
        self.emit("phase", phase="saving", total_steps=self.config.total_steps)
        self.accelerator.wait_for_everyone()
        bundle = self.export_bundle() if self.is_main else None
        if bundle is not None:
            self.emit(
                "final",
                bundle=str(bundle.path),
                artifact_id=bundle.id,
                global_step=self.global_step,
            )
        self.accelerator.end_training()
        return bundle
