"""The training loop: pivotal tuning (textual inversion, then LoRA) or DreamBooth-LoRA.

Follows cloneofsimo/lora's ``lora_pti``:

- Phase 1 (textual inversion): only the rows of the new tokens learn (tokens.py). Timesteps are
  drawn from the first 80% of the schedule, and gradients accumulate over
  ``gradient_accumulation_steps`` micro-steps.
- Phase 2 (tuning): peft LoRA on the denoiser (and the text encoders the family adapts, with
  ``train_text_encoder``), one learning rate per group, optional continued inversion, gradient
  clipping, all timesteps.

A step is one micro-batch, as in lora_pti. The model family (loraforge_core.families) gives
the objective (noise prediction or flow matching) and runs the denoiser. accelerate handles the
device, mixed precision and data parallelism. The pieces: phases.py (what each phase trains and
how fast), base_model.py (the frozen base model), tokens.py, data.py (batches), checkpoint.py
(resume state and bundles), checkpoint_scores.py (evaluations and the final artifact),
events.py (what is reported). ``train()`` is the entry point for Python callers; the trainer
service runs the same ``Trainer`` in a child process (run.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image

from loraforge_core.bundle import Bundle, read_bundle
from loraforge_core.evaluation import Evaluation
from loraforge_core.families.objectives import objective_loss
from trainer_service.config import TrainingConfig
from trainer_service.events import (
    CallbackReporter,
    Checkpoint,
    FinalArtifact,
    JobEvent,
    Log,
    NullReporter,
    Progress,
    Reporter,
)
from trainer_service.training import lora, phases, renders
from trainer_service.training.base_model import BaseModel
from trainer_service.training.checkpoint import TrainingState, export_bundle
from trainer_service.training.checkpoint_scores import CheckpointScores
from trainer_service.training.data import (
    Batch,
    InstanceExample,
    TrainingData,
    generate_class_images,
)
from trainer_service.training.faces import with_face_masks
from trainer_service.training.progress import StepRate, eta_seconds
from trainer_service.training.scoring import make_scorer
from trainer_service.training.tokens import PlaceholderTokens

log = logging.getLogger("loraforge.training")

INVERSION_TIMESTEP_FRACTION = 0.8


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
    """One training run of ``config`` on ``examples``, set up (model loaded, tokens added,
    data prepared) when constructed; ``run()`` trains and returns the final bundle."""

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
        self.paths = paths
        self.reporter = reporter or NullReporter()
        self.should_stop = should_stop
        self.seed = config.seed if config.seed is not None else random.randrange(2**31)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision, cpu=config.device == "cpu"
        )
        self.rank = self.accelerator.process_index
        self.global_step = 0
        self.evaluations = CheckpointScores()
        self._rate = StepRate()
        self._phase_started("preparing", config.total_steps)
        self.model = BaseModel.load(
            config.pretrained_model_name_or_path, self.accelerator, config.gradient_checkpointing,
            revision=config.revision, vae=config.pretrained_vae_name_or_path,
        )  # fmt: skip
        self.model.check_inpainting(config.train_inpainting)
        family = self.model.family
        self.objective = family.objective(self.model.noise_scheduler, config.objective_options)
        self.targets = config.denoiser_lora_targets(family)
        self.resolution = config.resolution or self.model.native_resolution
        self.tokens = PlaceholderTokens(
            self.model, config.learned_tokens, config.initializers(), self.seed
        )
        if config.use_face_segmentation_condition:
            sent = sum(e.mask is not None for e in examples)
            examples = with_face_masks(examples, lambda text: self.emit(Log("warning", text)))
            found = sum(e.mask is not None for e in examples) - sent
            self.emit(Log("info", f"face masks for {found} of {len(examples)} images"))
        self.data = TrainingData(
            config, examples, self.model.vae, self.resolution, self.accelerator.device,
            class_pixels=self._class_pixels(), bucket_step=self.model.size_step,
        )  # fmt: skip
        # Made before training, so that a scorer that cannot load fails the job at once.
        self.scorer = make_scorer(
            config.evaluation_scorer, config.evaluation_model, [e.image for e in examples],
            self.model.path, self.accelerator.device,
        ) if config.evaluation_scales and self.is_main else None  # fmt: skip
        self._report_ranks()

    # ---------------------------------------------------------------- reporting
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def emit(self, event: JobEvent) -> None:
        if self.is_main:
            self.reporter.emit(event)
            if isinstance(event, Log):  # the job's narrative in train.log too
                log.log(logging.getLevelName(event.level.upper()), event.message)

    def _phase_started(self, phase: str, steps: int) -> None:
        self._rate.start_phase()
        self.emit(Log("info", f"phase {phase} ({steps} steps)"))

    def _progress(self, phase: str, step: int, total: int, loss: float, lr: float) -> None:
        rate = self._rate.step()
        remaining = self.config.total_steps - self.global_step
        self.emit(Progress(
            phase=phase, step=step, total_steps=total, loss=loss, lr=lr, steps_per_second=rate,
            eta_seconds=eta_seconds(remaining, rate), global_step=self.global_step,
        ))  # fmt: skip

    # ---------------------------------------------------------------- set-up
    def _report_ranks(self) -> None:
        """The world size and each rank's first micro-batch (its own shard of the data)."""
        generator = _step_generator(self.seed, self.rank, 1)
        first = self.data.draw_indices(generator)
        shards = gather_object([first]) if self.accelerator.num_processes > 1 else [first]
        self.emit(Log("info", (
            f"data parallel over {self.accelerator.num_processes} process(es) on "
            f"{self.accelerator.device}; first batch per rank: {shards}"
        )))  # fmt: skip

    def _class_pixels(self) -> torch.Tensor | None:
        config = self.config
        if config.method != "dreambooth_lora" or not config.with_prior_preservation:
            return None
        self.emit(Log("info", f"generating {config.num_class_images} class images"))
        model = self.model
        return generate_class_images(model.path, model.family, config, self.resolution, self.seed,
                                     self.accelerator.device, model.vae)  # fmt: skip

    # ---------------------------------------------------------------- loss
    def _loss(
        self, denoiser: Any, text_encoders: list[Any], batch: Batch, generator: torch.Generator,
        t_fraction: float,
    ) -> torch.Tensor:  # fmt: skip
        noised = self.objective.noised(batch.latents, generator, t_fraction)
        with self.accelerator.autocast():
            prediction = self.model.family.predict(
                denoiser, noised, self.model.encode(batch.captions, text_encoders),
                dtype=self.model.weight_dtype, time_ids=batch.time_ids,
                conditioning=batch.conditioning, guidance=self.config.guidance_scale,
            )  # fmt: skip
        return objective_loss(prediction, noised, weights=batch.weights)

    def _step_loss(
        self, denoiser: Any, text_encoders: list[Any], t_fraction: float
    ) -> torch.Tensor:
        """The loss of the current step's micro-batch (plus the prior-preservation term);
        ``text_encoders``: every text encoder, the trained ones as accelerate wraps them."""
        generator = _step_generator(self.seed, self.rank, self.global_step)
        data = self.data
        loss = self._loss(denoiser, text_encoders, data.batch(generator), generator, t_fraction)
        if data.class_pixels is not None:
            prior = self._loss(
                denoiser, text_encoders, data.class_batch(generator), generator, t_fraction
            )
            loss = loss + self.config.prior_loss_weight * prior
        return loss

    # ---------------------------------------------------------------- optimisation helpers
    def _lr(self, base: float) -> float:
        return phases.scaled_lr(self.config, base, self.accelerator.num_processes)

    def _schedule(self, optimizer: Any, steps: int, name: str, warmup_steps: int) -> Any:
        return phases.schedule(optimizer, steps, name, warmup_steps, self.accelerator.num_processes)

    def _prepare(
        self, modules: list[Any], optimizer: Any, scheduler: Any, resume: TrainingState | None
    ) -> tuple[list[Any], Any, Any]:
        """accelerate's wrappers of a phase's trained modules, optimizer and schedule; with
        ``resume``, the optimizer and the schedule continue from the checkpoint."""
        *wrapped, optimizer, scheduler = self.accelerator.prepare(*modules, optimizer, scheduler)
        if resume is not None:
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.lr_scheduler)
        return wrapped, optimizer, scheduler

    def _check_stop(self) -> None:
        if self.should_stop():
            raise StopRequested()

    # ---------------------------------------------------------------- checkpoints and bundles
    def _components(self) -> dict[str, Any]:
        """The modules LoRA can adapt, by the family's names (unet, text_encoder...)."""
        modules = [self.model.denoiser, *self.model.lora_text_encoders]
        return dict(zip(self.model.family.components, modules, strict=True))

    def _lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The peft LoRA weights of each component (empty before phase 2)."""
        return {name: lora.peft_state(module) for name, module in self._components().items()}

    def _save_checkpoint(self, phase: str, optimizer: Any, scheduler: Any) -> None:
        """A bundle artifact of the weights so far (scored first, with evaluation on), then
        the training state (atomic), which records the evaluations too."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            evaluation = self._evaluate()
            started = time.perf_counter()
            bundle = self.export_bundle(evaluation)
            TrainingState(
                global_step=self.global_step, phase=phase, seed=self.seed,
                embeddings=self.tokens.rows(), lora=self._lora_states(),
                optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
                torch_rng=torch.get_rng_state(),
                evaluations=self.evaluations.to_state(bundle.id, evaluation),
            ).save(self.paths.checkpoints)  # fmt: skip
            self.emit(Checkpoint(bundle.id, self.global_step, time.perf_counter() - started))
            if evaluation is not None:
                self.emit(self.evaluations.record(bundle.id, evaluation))
        self.accelerator.wait_for_everyone()

    def _restore(self, state: TrainingState) -> None:
        """The step, seed, token rows, RNG and evaluations of a checkpoint (the phase
        restores the rest)."""
        self.global_step = state.global_step
        self.seed = state.seed
        self.tokens.load_rows(state.embeddings)
        torch.set_rng_state(state.torch_rng)
        self.evaluations = CheckpointScores.from_state(state.evaluations)

    # ---------------------------------------------------------------- renders
    def _evaluate(self) -> Evaluation | None:
        if self.scorer is None:
            return None
        components = list(self._components().values())
        return renders.evaluate_weights(self.scorer, self.config, self.model, components,
                                        self.resolution, self.global_step)  # fmt: skip

    def export_bundle(self, evaluation: Evaluation | None = None) -> Bundle:
        return export_bundle(
            self.paths.artifacts, self.config, self.model, lora=self._lora_states(),
            tokens=self.tokens.learned(), global_step=self.global_step, seed=self.seed,
            processes=self.accelerator.num_processes, evaluation=evaluation,
        )  # fmt: skip

    def _after_step(self, phase: str, optimizer: Any, scheduler: Any) -> None:
        if self.global_step % self.config.save_steps == 0:
            self._save_checkpoint(phase, optimizer, scheduler)
        if self.is_main:
            event = renders.preview(self.config, self.model, self.resolution, self.seed,
                                    self.global_step)  # fmt: skip
            if event is not None:
                self.emit(event)

    # ---------------------------------------------------------------- phases
    def _run_inversion(self, resume: TrainingState | None) -> None:
        """Phase 1; ``resume`` is an inversion-phase checkpoint to continue from."""
        config = self.config
        steps = config.inversion_steps
        if steps == 0 or self.global_step >= steps:
            return
        embeddings = self.model.embedding_weights()  # every encoder's: SDXL learns in both
        for embedding in embeddings:
            embedding.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            embeddings, lr=self._lr(config.learning_rate_ti), weight_decay=config.weight_decay_ti
        )
        accumulation = config.gradient_accumulation_steps
        # The schedule counts optimizer steps (one per accumulation window).
        scheduler = self._schedule(
            optimizer, math.ceil(steps / accumulation), config.lr_scheduler, config.lr_warmup_steps
        )
        text_encoders, optimizer, scheduler = self._prepare(
            self.model.text_encoders, optimizer, scheduler, resume
        )
        for text_encoder in text_encoders:
            text_encoder.train()
        self._phase_started("inversion", steps)
        while self.global_step < steps:
            self._check_stop()
            self.global_step += 1
            loss = self._step_loss(self.model.denoiser, text_encoders, INVERSION_TIMESTEP_FRACTION)
            self.accelerator.backward(loss / accumulation)
            lr = scheduler.get_last_lr()[0]
            if self.global_step % accumulation == 0 or self.global_step == steps:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.tokens.after_step(lr, config.clip_ti_decay)
                scheduler.step()
            self._progress("inversion", self.global_step, steps, loss.item(), lr)
            self._after_step("inversion", optimizer, scheduler)
        for embedding in embeddings:
            embedding.requires_grad_(False)
        self.accelerator.free_memory()

    def _run_tuning(self, resume: TrainingState | None) -> None:
        """Phase 2; ``resume`` is a tuning-phase checkpoint to continue from."""
        config = self.config
        offset = config.inversion_steps
        steps = config.max_train_steps_tuning
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG
            torch.manual_seed(self.seed)  # so the seed decides the initial LoRA too
            groups = phases.add_lora(
                config, self.targets, self.model.denoiser, self.model.lora_text_encoders,
                self.accelerator.num_processes,
            )  # fmt: skip
        if resume is not None:
            for name, module in self._components().items():
                if name == self.model.family.denoiser or config.train_text_encoder:
                    lora.load_peft_state(module, resume.lora[name])
        invert = config.continue_inversion and bool(self.tokens.ids)
        if invert:
            embeddings = self.tokens.weights()
            for embedding in embeddings:
                embedding.requires_grad_(True)
            lr_ti = config.continue_inversion_lr or config.learning_rate_ti
            groups.append({"params": embeddings, "lr": self._lr(lr_ti)})
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay_lora)
        scheduler = self._schedule(optimizer, steps, *config.tuning_schedule)
        trains_text = config.train_text_encoder or invert
        # Continued inversion trains every encoder's token rows; LoRA only the adapted ones.
        text_trained = self.model.text_encoders if invert else self.model.lora_text_encoders
        trained = [self.model.denoiser, *(text_trained if trains_text else [])]
        wrapped, optimizer, scheduler = self._prepare(trained, optimizer, scheduler, resume)
        denoiser = wrapped[0]
        text_encoders = wrapped[1:] if invert else self.model.with_trained(wrapped[1:])
        denoiser.train()
        for text_encoder in text_encoders:
            text_encoder.train(trains_text)
        params = [p for group in groups for p in group["params"]]
        self._phase_started("tuning", steps)
        while self.global_step < offset + steps:
            self._check_stop()
            self.global_step += 1
            loss = self._step_loss(denoiser, text_encoders, 1.0)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(params, config.max_grad_norm)
            lrs = scheduler.get_last_lr()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if invert:
                self.tokens.after_step(lrs[-1], config.clip_ti_decay)
            self._progress("tuning", self.global_step - offset, steps, loss.item(), lrs[0])
            self._after_step("tuning", optimizer, scheduler)

    def _final_bundle(self) -> Bundle:
        """The last step's bundle: the last checkpoint's evaluation where it was one, else
        scored now (with evaluation on)."""
        last = self.evaluations.last()
        if last is not None and last[1].global_step == self.global_step:
            return self.export_bundle(last[1])
        evaluation = self._evaluate()
        bundle = self.export_bundle(evaluation)
        if evaluation is not None:
            self.emit(self.evaluations.record(bundle.id, evaluation))
        return bundle

    # ---------------------------------------------------------------- entry point
    def run(self, resume: bool = True) -> Bundle | None:
        """Train (resuming from the latest checkpoint when there is one); return the final
        artifact's bundle (the last step's, or with ``select_final`` best the best checkpoint's).

        Ranks other than the main process return None.
        """
        path = TrainingState.latest(self.paths.checkpoints) if resume else None
        state = TrainingState.load(path) if path is not None else None
        if state is not None:
            self._restore(state)
            self.emit(Log("info", f"resumed from checkpoint at step {self.global_step}"))
        if state is not None and state.phase == "tuning":
            self._run_tuning(state)
        else:
            self._run_inversion(state)
            self._run_tuning(None)
        self._phase_started("saving", self.config.total_steps)
        self.accelerator.wait_for_everyone()
        bundle = self._final_bundle() if self.is_main else None
        if bundle is not None:
            artifact_id, step = self.evaluations.final(
                bundle.id, self.global_step, self.config.select_final
            )
            if artifact_id != bundle.id:  # an earlier checkpoint scored best
                bundle = read_bundle(self.paths.artifacts / artifact_id)
            self.emit(FinalArtifact(artifact_id=artifact_id, global_step=step))
        self.accelerator.end_training()
        return bundle


def train(
    config: TrainingConfig, data: Sequence[InstanceExample | Image.Image], output_dir: Path,
    on_event: Callable[[JobEvent], None] = lambda event: None, *, resume: bool = True,
) -> Bundle:  # fmt: skip
    """Train ``config`` on ``data`` (instance images, or examples with captions and masks) and
    return the final bundle, in ``output_dir``/artifacts; ``on_event`` gets every event the
    trainer service would stream. Checkpoints go to ``output_dir``/checkpoints, and a rerun
    resumes from the latest one (``resume``). The entry point for Python callers; the trainer
    service runs the same ``Trainer`` in a child process (run.py)."""
    examples = [d if isinstance(d, InstanceExample) else InstanceExample(d) for d in data]
    paths = RunPaths(Path(output_dir) / "checkpoints", Path(output_dir) / "artifacts")
    bundle = Trainer(config, examples, paths, CallbackReporter(on_event)).run(resume=resume)
    if bundle is None:  # a data-parallel rank other than the first
        raise RuntimeError("train() runs in one process; launch Trainer per rank instead")
    return bundle
