"""What a Generate request is, its defaults and limits, and how it is validated.

The one home of the facts the edge, the engine and the scheduler share: default steps and
guidance, the scheduler names (and the diffusers class each one means), the image formats, the
limits on sizes and adapters, and what an adapter id may look like.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraforge_core.errors import InvalidArgument, Violations

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_STEPS = 30
DEFAULT_SCHEDULER = "default"  # the model's own scheduler
# Scheduler name -> (diffusers class, extra config); "default" keeps the model's own class.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    DEFAULT_SCHEDULER: ("", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # Runge-Kutta warm-up steps need at least 4 steps; SD's own PNDM config skips them.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # ours -> PIL's
MAX_SIDE = 1024
MAX_STEPS = 150
MAX_IMAGES = 8
MAX_INPUT_IMAGE_BYTES = 32 * 1024 * 1024  # an init or mask image
MAX_PROMPT_CHARS = 2000
MAX_ADAPTERS_PER_REQUEST = 8
MAX_SCALE = 4.0
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' pipelines' defaults
SEED_LIMIT = 2**64  # torch's generators take seeds below it; image i uses seed + i
RESERVED_TOKEN_PREFIX = "<|lf"  # the server's private names of learned tokens
_ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ADAPTER_ID_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass
class AdapterRequest:
    adapter_id: str
    scale: float = 1.0
    text_encoder_scale: float | None = None
    # The scales multiply the adapter's recommended scale (its evaluation's; 1 without one).
    use_recommended_scale: bool = False
    source: str = ""  # a reference (references.py) the adapter is fetched from on first use

    @property
    def te_scale(self) -> float:
        return self.scale if self.text_encoder_scale is None else self.text_encoder_scale


@dataclass
class GenerationSpec:
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = DEFAULT_STEPS
    guidance_scale: float | None = None  # None: the model family's (SD: 7.5, FLUX.1: 3.5)
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    num_images: int = 1
    adapters: list[AdapterRequest] = field(default_factory=list)
    output_format: str = "png"
    init_image: Image.Image | None = None  # img2img and inpainting start from it (RGB)
    mask_image: Image.Image | None = None  # inpainting: white = repaint (L)
    strength: float | None = None  # None: DEFAULT_STRENGTH of the mode
    max_sequence_length: int = 0  # FLUX.1: T5 tokens per prompt (0: the model's, at most 512)

    @property
    def mode(self) -> str:
        """txt2img, img2img or inpaint."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"

    @property
    def denoise_strength(self) -> float:
        """How much of the schedule runs: 1 for text to image."""
        if self.strength is not None:
            return self.strength
        return DEFAULT_STRENGTH.get(self.mode, 1.0)


def batch_key(spec: GenerationSpec) -> tuple:
    """The settings that requests must share to be denoised in one batch."""
    return (spec.width, spec.height, spec.steps, spec.guidance_scale, spec.scheduler,
            spec.mode, spec.denoise_strength, spec.max_sequence_length)  # fmt: skip


@dataclass
class GenerationJob:
    """One request in a denoising batch, with its progress and cancellation callbacks."""

    spec: GenerationSpec
    on_step: Callable[[int, int], None] = lambda step, total: None
    is_cancelled: Callable[[], bool] = lambda: False


@dataclass
class GeneratedImage:
    data: bytes
    seed: int
    width: int
    height: int
    format: str


# What serving a request in a batch answers: its images, or the error that refused it alone.
Outcome = list[GeneratedImage] | Exception

_LEARNED_TOKEN = re.compile(r"^[^\s\x00-\x1f\x7f]{1,64}$")


def learned_token_problem(token: str) -> str | None:
    """Why an adapter's learned token cannot stand in a prompt (it is replaced wherever it
    appears), or None."""
    if not _LEARNED_TOKEN.match(token):
        return f"learned token {token!r} must be 1-64 characters without spaces or controls"
    if RESERVED_TOKEN_PREFIX in token:
        return f"learned token {token!r} uses {RESERVED_TOKEN_PREFIX!r}, reserved for the server"
    return None


def is_adapter_id(adapter_id: str) -> bool:
    return bool(_ADAPTER_ID.match(adapter_id))


def validate_adapter_id(adapter_id: str, field_name: str) -> None:
    if not is_adapter_id(adapter_id):
        raise InvalidArgument(ADAPTER_ID_RULE, field_name)


def validate_spec(spec: GenerationSpec) -> None:
    """Raise InvalidArgument naming every field of the request that is out of range."""
    v = Violations()
    v.check(bool(spec.prompt.strip()), "prompt", "give a prompt")
    for name in ("prompt", "negative_prompt"):
        text = getattr(spec, name)
        v.check(len(text) <= MAX_PROMPT_CHARS, name, f"at most {MAX_PROMPT_CHARS} characters")
        v.check(
            RESERVED_TOKEN_PREFIX not in text,
            name,
            f"{RESERVED_TOKEN_PREFIX!r} is reserved for the server's token names",
        )
    for name in ("width", "height"):
        value = getattr(spec, name)
        v.check(
            value == 0 or (value % 8 == 0 and 8 <= value <= MAX_SIDE),
            name,
            f"a multiple of 8 in 8..{MAX_SIDE} (0: the model's size, or the init image's "
            "rounded down to a multiple of 8; set it to resize a larger init image)",
        )
    v.check(1 <= spec.steps <= MAX_STEPS, "num_inference_steps", f"in 1..{MAX_STEPS}")
    v.check(
        spec.guidance_scale is None
        or (math.isfinite(spec.guidance_scale) and 0 <= spec.guidance_scale <= 50),
        "guidance_scale",
        "in 0..50",
    )
    v.check(1 <= spec.num_images <= MAX_IMAGES, "num_images", f"in 1..{MAX_IMAGES}")
    v.check(
        spec.seed >= 0 and spec.seed + spec.num_images <= SEED_LIMIT,
        "seed",
        "seed + num_images - 1 (the last image's seed) must be below 2^64",
    )
    v.check(spec.scheduler in SCHEDULERS, "scheduler", f"one of {tuple(SCHEDULERS)}")
    _check_init_image(v, spec)
    v.check(spec.output_format in IMAGE_FORMATS, "output_format", f"one of {tuple(IMAGE_FORMATS)}")
    ids = [a.adapter_id for a in spec.adapters]
    v.check(len(ids) == len(set(ids)), "adapters", "name each adapter once")
    v.check(
        len(ids) <= MAX_ADAPTERS_PER_REQUEST,
        "adapters",
        f"at most {MAX_ADAPTERS_PER_REQUEST} adapters per request",
    )
    for i, adapter in enumerate(spec.adapters):
        v.check(is_adapter_id(adapter.adapter_id), f"adapters[{i}].adapter_id", ADAPTER_ID_RULE)
        for name, value in (("scale", adapter.scale), ("text_encoder_scale", adapter.te_scale)):
            v.check(
                math.isfinite(value) and -MAX_SCALE <= value <= MAX_SCALE,
                f"adapters[{i}].{name}",
                f"in [-{MAX_SCALE:g}, {MAX_SCALE:g}]",
            )
    v.raise_if_any()


def _check_init_image(v: Violations, spec: GenerationSpec) -> None:
    init, mask = spec.init_image, spec.mask_image
    if init is None:
        v.check(mask is None, "mask_image", "inpainting needs the init_image to repaint")
        v.check(spec.strength is None, "strength", "applies to img2img and inpainting only")
        return
    if spec.strength is not None:
        v.check(math.isfinite(spec.strength) and 0 <= spec.strength <= 1, "strength", "in [0, 1]")
    if mask is not None:
        v.check(
            mask.size == init.size,
            "mask_image",
            f"is {mask.width}x{mask.height}; give a mask the init image's size, "
            f"{init.width}x{init.height}",
        )
