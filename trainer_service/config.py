"""The one description of a training run: every ``lora_pti`` option with its default.

The gRPC request (which the client's ``loraforge train`` builds) maps onto ``TrainingConfig``; it
round-trips through JSON and is stored with every job and in every artifact manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from loraforge_core.errors import Violations
from loraforge_core.families import Family
from loraforge_core.families.objectives import WEIGHTING_SCHEMES, ObjectiveOptions
from loraforge_core.targets import DEFAULT_CLIP_TARGETS

METHODS = ("pti", "dreambooth_lora")
TEMPLATES = ("object", "style", "none")
LR_SCHEDULERS = ("linear", "constant", "constant_with_warmup", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
EVALUATION_SCORERS = ("auto", "toy_world", "clip")
FINAL_SELECTIONS = ("last", "best")
MAX_STEPS = 100_000
MAX_RANK = 256
# No dots: A1111 cuts a bundled token at its first "." and loads it under another name.
_TOKEN_PATTERN = re.compile(r"^<[^<>\s.]{1,32}>$")
_INIT_PATTERN = re.compile(r"^<rand-(\d+(\.\d+)?)>$")
_REVISION_PATTERN = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


@dataclass
class TrainingConfig:
    """A LoRA-PTI or DreamBooth-LoRA training run (defaults as in cloneofsimo's lora_pti)."""

    pretrained_model_name_or_path: str = ""
    revision: str = ""  # of the base model on the hub (branch, tag or commit); empty: main
    pretrained_vae_name_or_path: str = ""  # a VAE to train with instead of the model's own
    method: str = "pti"
    placeholder_tokens: list[str] = field(default_factory=lambda: ["<s1>"])
    initializer_tokens: list[str] = field(default_factory=list)  # default: <rand-0.017> each
    use_template: str = "object"
    # "DATA|TOKENS": DATA in the images' own captions stands for TOKENS (lora_pti's option),
    # e.g. "sks|<s1>" trains on captions written for DreamBooth.
    placeholder_token_at_data: str = ""
    # Masked training (lora_pti's): each image's loss is weighted toward its mask (white = the
    # subject), mapped to [0.5, 1.5] and raised to mask_temperature (training/masks.py).
    mask_temperature: float = 1.0
    use_mask_captioned_data: bool = False  # every image brings a mask and a caption
    use_face_segmentation_condition: bool = False  # masks of detected faces where none is sent
    train_inpainting: bool = False  # a 9-channel inpainting UNet, on random masks
    resolution: int | None = None  # None: the model's native size (512 for SD 1.5)
    # Each image keeps its aspect ratio, cut to the nearest bucket of about resolution**2
    # pixels (data.buckets); off: every image is centre-cropped square, as lora_pti does.
    aspect_ratio_bucketing: bool = True
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    scale_lr: bool = False
    learning_rate_unet: float = 1e-4
    learning_rate_text: float = 1e-5
    learning_rate_ti: float = 5e-4
    color_jitter: bool = True  # on pixels: only with cached_latents off
    random_flip: bool = True
    # Fraction of training captions replaced by the empty prompt (kohya's caption_dropout_rate):
    # trains the adapter's unconditional prediction too, which classifier-free guidance uses.
    caption_dropout: float = 0.0
    # PTI: phase 1's schedule, and phase 2 has its own (lora_pti's lr_scheduler_lora); the one
    # phase of DreamBooth-LoRA takes lr_scheduler and lr_warmup_steps.
    lr_scheduler: str = "linear"
    lr_warmup_steps: int = 0
    lr_scheduler_lora: str = "linear"
    lr_warmup_steps_lora: int = 0
    # Min-SNR-gamma loss weighting (Hang et al., 2023; 5.0 is the paper's); None: unweighted.
    # Noise-prediction (DDPM) families only.
    snr_gamma: float | None = None
    # Flow-matching families (FLUX.1): how sigmas are drawn and losses weighted (diffusers'
    # weighting_scheme: none = uniform; logit_normal and mode draw, sigma_sqrt and cosmap
    # weight), and the guidance a guidance-embedded model (FLUX.1-dev) trains at.
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 3.5
    save_steps: int = 100
    max_train_steps_ti: int = 1000
    max_train_steps_tuning: int = 1000
    perform_inversion: bool = True
    clip_ti_decay: bool = True
    weight_decay_ti: float = 0.0
    weight_decay_lora: float = 0.001
    continue_inversion: bool = False
    continue_inversion_lr: float | None = None
    train_text_encoder: bool = True
    lora_rank: int = 4
    lora_alpha: float | None = None  # None: rank (scale 1)
    lora_dropout: float = 0.0
    # The denoiser's LoRA targets; empty: the model family's (SD: lora_pti's attention
    # projections and GEGLU; FLUX.1: every attention projection and feed-forward).
    lora_unet_target_modules: list[str] = field(default_factory=list)
    use_extended_lora: bool = False  # the family's extended set too (SD: the convolutions)
    lora_clip_target_modules: list[str] = field(default_factory=lambda: [*DEFAULT_CLIP_TARGETS])
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    cached_latents: bool = True
    max_grad_norm: float = 1.0
    seed: int | None = None
    device: str = "auto"
    # DreamBooth-LoRA
    instance_prompt: str = "a photo of sks object"
    with_prior_preservation: bool = False
    class_prompt: str = ""
    num_class_images: int = 50
    prior_loss_weight: float = 1.0
    # Previews
    validation_prompt: str = ""
    validation_steps: int | None = None  # None: save_steps
    # Evaluation of every checkpoint (training/scoring.py): rendered at these adapter scales
    # and scored; none given, none done.
    evaluation_scales: list[float] = field(default_factory=list)
    evaluation_prompts: list[str] = field(default_factory=list)  # "{}": the learned tokens
    evaluation_images: int = 4  # per prompt and scale
    evaluation_seed: int = 0
    evaluation_scorer: str = "auto"  # auto: toy world on loraforge's toy models, else CLIP
    evaluation_model: str = ""  # CLIP's hub id or folder; empty: openai/clip-vit-base-patch32
    evaluation_steps: int = 20
    evaluation_guidance: float = 5.0
    select_final: str = "last"  # last | best: the final artifact is the best checkpoint

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def inversion_steps(self) -> int:
        """Phase 1 steps: zero for DreamBooth-LoRA or when inversion is off."""
        if self.method != "pti" or not self.perform_inversion:
            return 0
        return self.max_train_steps_ti

    @property
    def total_steps(self) -> int:
        return self.inversion_steps + self.max_train_steps_tuning

    def denoiser_lora_targets(self, family: Family) -> list[str]:
        """The denoiser's LoRA targets on a model of ``family``: the configured ones or the
        family's, plus the family's extended set with ``use_extended_lora``."""
        denoiser = family.denoiser
        targets = list(self.lora_unet_target_modules) or list(family.lora_targets(denoiser))
        if self.use_extended_lora:
            extended = family.lora_targets(denoiser, extended=True)
            targets += [t for t in extended if t not in targets]
        return targets

    @property
    def objective_options(self) -> ObjectiveOptions:
        return ObjectiveOptions(
            snr_gamma=self.snr_gamma, weighting_scheme=self.weighting_scheme,
            logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
        )  # fmt: skip

    @property
    def tuning_schedule(self) -> tuple[str, int]:
        """(scheduler, warm-up steps) of the LoRA tuning phase."""
        if self.method == "pti":
            return self.lr_scheduler_lora, self.lr_warmup_steps_lora
        return self.lr_scheduler, self.lr_warmup_steps

    @property
    def learned_tokens(self) -> list[str]:
        return list(self.placeholder_tokens) if self.method == "pti" else []

    def initializers(self) -> list[str]:
        return list(self.initializer_tokens) or ["<rand-0.017>"] * len(self.placeholder_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainingConfig:
        return cls.from_dict(json.loads(text))

    def validate(self, violations: Violations | None = None, prefix: str = "config.") -> Violations:
        """Collect every problem with field names (``prefix`` + option name)."""
        v = violations if violations is not None else Violations()

        def f(name: str) -> str:
            return prefix + name

        v.check(self.method in METHODS, f("method"), f"must be one of {METHODS}")
        v.check(self.use_template in TEMPLATES, f("use_template"), f"must be one of {TEMPLATES}")
        for name in ("lr_scheduler", "lr_scheduler_lora"):
            value = getattr(self, name)
            v.check(value in LR_SCHEDULERS, f(name), f"must be one of {LR_SCHEDULERS}")
        v.check(
            self.mixed_precision in MIXED_PRECISIONS,
            f("mixed_precision"),
            f"must be one of {MIXED_PRECISIONS}",
        )
        if self.resolution is not None:
            v.check(
                self.resolution % 8 == 0 and 8 <= self.resolution <= 2048,
                f("resolution"),
                "must be a multiple of 8 in 8..2048",
            )
        for name in ("train_batch_size", "gradient_accumulation_steps", "save_steps"):
            value = getattr(self, name)
            v.check(1 <= value <= 1024, f(name), "must be in 1..1024")
        for name in (
            "max_train_steps_ti", "max_train_steps_tuning", "lr_warmup_steps",
            "lr_warmup_steps_lora",
        ):  # fmt: skip
            value = getattr(self, name)
            v.check(0 <= value <= MAX_STEPS, f(name), f"must be in 0..{MAX_STEPS}")
        v.check(
            self.total_steps >= 1,
            f("max_train_steps_tuning"),
            "the run has no steps: set max_train_steps_ti or max_train_steps_tuning",
        )
        for name in (
            "learning_rate_unet",
            "learning_rate_text",
            "learning_rate_ti",
            "continue_inversion_lr",
        ):
            value = getattr(self, name)
            if value is not None:
                v.check(math.isfinite(value) and 0 <= value <= 1, f(name), "must be in [0, 1]")
        for name in ("weight_decay_ti", "weight_decay_lora", "lora_dropout"):
            value = getattr(self, name)
            v.check(math.isfinite(value) and 0 <= value < 1, f(name), "must be in [0, 1)")
        v.check(1 <= self.lora_rank <= MAX_RANK, f("lora_rank"), f"must be in 1..{MAX_RANK}")
        if self.lora_alpha is not None:
            v.check(
                math.isfinite(self.lora_alpha) and 0 < self.lora_alpha <= 4 * MAX_RANK,
                f("lora_alpha"),
                "must be positive",
            )
        v.check(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            f("max_grad_norm"),
            "must be positive",
        )
        v.check(
            math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
            f("prior_loss_weight"),
            "must be >= 0",
        )
        v.check(1 <= self.num_class_images <= 1000, f("num_class_images"), "must be in 1..1000")
        v.check(
            math.isfinite(self.caption_dropout) and 0 <= self.caption_dropout < 1,
            f("caption_dropout"),
            "must be in [0, 1)",
        )
        v.check(
            not self.revision or _REVISION_PATTERN.match(self.revision) is not None,
            f("revision"),
            "must be a branch, tag or commit of the model's repository (letters, digits, ._/-)",
        )
        v.check(len(self.pretrained_vae_name_or_path) <= 1024, f("pretrained_vae_name_or_path"),
                "must be at most 1024 characters")  # fmt: skip
        if self.placeholder_token_at_data:
            data, _, tokens = self.placeholder_token_at_data.partition("|")
            v.check(
                bool(data.strip()) and bool(tokens.strip()) and "|" not in tokens
                and len(self.placeholder_token_at_data) <= 200,
                f("placeholder_token_at_data"),
                'must be "DATA|TOKENS", e.g. "sks|<s1>" (at most 200 characters)',
            )  # fmt: skip
        v.check(
            math.isfinite(self.mask_temperature) and 0 <= self.mask_temperature <= 16,
            f("mask_temperature"),
            "must be in [0, 16] (1.0 is lora_pti's; 0 weights every pixel alike)",
        )
        if self.use_mask_captioned_data:
            v.check(
                self.use_template == "none",
                "template",
                "use_mask_captioned_data trains on the images' own captions: use template NONE",
            )
        if self.train_inpainting:
            v.check(
                not self.with_prior_preservation or self.method != "dreambooth_lora",
                f("with_prior_preservation"),
                "prior preservation draws class images with a text-to-image pipeline, which an "
                "inpainting base cannot run: turn one of them off",
            )
        if self.snr_gamma is not None:
            v.check(
                math.isfinite(self.snr_gamma) and self.snr_gamma > 0,
                f("snr_gamma"),
                "must be positive (5.0 is the paper's); unset turns the weighting off",
            )
        if self.validation_steps is not None:
            v.check(self.validation_steps >= 1, f("validation_steps"), "must be >= 1")
        self._validate_evaluation(v, f)
        v.check(bool(self.lora_clip_target_modules), f("lora_clip_target_modules"),
                "needs at least one module name")  # fmt: skip
        self._validate_flow_matching(v, f)
        for name in ("lora_unet_target_modules", "lora_clip_target_modules"):
            modules = getattr(self, name)
            v.check(
                all(re.fullmatch(r"[A-Za-z0-9_.]{1,64}", m) for m in modules),
                f(name),
                "module names are letters, digits, '_' and '.'",
            )
        if self.seed is not None:
            v.check(0 <= self.seed < 2**63, f("seed"), "must be in 0..2^63-1")
        self._validate_tokens(v)
        if self.method == "dreambooth_lora":
            v.check(
                bool(self.instance_prompt.strip()),
                f("instance_prompt"),
                "DreamBooth-LoRA needs an instance prompt",
            )
            if self.with_prior_preservation:
                v.check(
                    bool(self.class_prompt.strip()),
                    f("class_prompt"),
                    "prior preservation needs a class prompt",
                )
        return v

    def _validate_flow_matching(self, v: Violations, f: Any) -> None:
        v.check(self.weighting_scheme in WEIGHTING_SCHEMES, f("weighting_scheme"),
                f"must be one of {', '.join(WEIGHTING_SCHEMES)}")  # fmt: skip
        v.check(math.isfinite(self.logit_mean), f("logit_mean"), "must be finite")
        v.check(math.isfinite(self.logit_std) and self.logit_std > 0, f("logit_std"),
                "must be positive")  # fmt: skip
        v.check(math.isfinite(self.mode_scale), f("mode_scale"), "must be finite")
        v.check(math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= 100,
                f("guidance_scale"), "must be in 0..100 (FLUX.1-dev: 1 to 3.5)")  # fmt: skip

    def _validate_evaluation(self, v: Violations, f: Any) -> None:
        scales = self.evaluation_scales
        v.check(len(scales) <= 16, f("evaluation_scales"), "give at most 16 scales")
        v.check(all(math.isfinite(s) and -4 <= s <= 4 for s in scales), f("evaluation_scales"),
                "scales must be in [-4, 4] (0 is the base model with the tokens)")  # fmt: skip
        v.check(
            len(self.evaluation_prompts) <= 8
            and all(0 < len(p) <= 300 for p in self.evaluation_prompts),
            f("evaluation_prompts"), "give at most 8 prompts of 1 to 300 characters",
        )  # fmt: skip
        v.check(1 <= self.evaluation_images <= 64, f("evaluation_images"), "must be in 1..64")
        v.check(1 <= self.evaluation_steps <= 200, f("evaluation_steps"), "must be in 1..200")
        v.check(0 <= self.evaluation_seed < 2**63, f("evaluation_seed"), "must be in 0..2^63-1")
        v.check(
            math.isfinite(self.evaluation_guidance) and 0 <= self.evaluation_guidance <= 30,
            f("evaluation_guidance"), "must be in [0, 30]",
        )  # fmt: skip
        v.check(self.evaluation_scorer in EVALUATION_SCORERS, f("evaluation_scorer"),
                f"must be one of {EVALUATION_SCORERS}")  # fmt: skip
        v.check(len(self.evaluation_model) <= 1024, f("evaluation_model"),
                "must be at most 1024 characters")  # fmt: skip
        v.check(self.select_final in FINAL_SELECTIONS, f("select_final"),
                f"must be one of {FINAL_SELECTIONS}")  # fmt: skip
        if self.select_final == "best":
            v.check(bool(scales), f("select_final"),
                    "best is chosen by evaluation: give evaluation_scales too")  # fmt: skip

    def _validate_tokens(self, v: Violations) -> None:
        if self.method != "pti":
            return
        tokens = self.placeholder_tokens
        v.check(1 <= len(tokens) <= 16, "placeholder_tokens", "give 1 to 16 tokens, e.g. <s1>")
        v.check(len(set(tokens)) == len(tokens), "placeholder_tokens", "tokens must differ")
        for i, token in enumerate(tokens):
            v.check(
                bool(_TOKEN_PATTERN.match(token)),
                f"placeholder_tokens[{i}]",
                f"{token!r} must look like <name>: angle brackets, no spaces or dots (A1111 cuts a "
                "token at its first dot), <= 32 chars",
            )
        if self.initializer_tokens:
            v.check(
                len(self.initializer_tokens) == len(tokens),
                "initializer_tokens",
                f"give one per placeholder token ({len(tokens)}), or none",
            )
            for i, init in enumerate(self.initializer_tokens):
                ok = (
                    init == "<zero>"
                    or bool(_INIT_PATTERN.match(init))
                    or (bool(init.strip()) and " " not in init.strip())
                )
                v.check(
                    ok,
                    f"initializer_tokens[{i}]",
                    "an existing word, <rand-STD> (e.g. <rand-0.017>) or <zero>",
                )
