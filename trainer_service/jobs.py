"""Job creation: validate a request completely, then store its images and config and queue it.

Nothing is written for a request that fails validation.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from loraforge_core import families
from loraforge_core.errors import FailedPrecondition, InvalidArgument, Violations
from loraforge_core.images import decode_image
from loraforge_core.logs import REQUEST_ID
from loraforge_core.models import resolve_model
from loraforge_core.objectstore import ObjectStore
from trainer_service.config import TrainingConfig
from trainer_service.job_store import JobRecord, JobStore
from trainer_service.jobdir import ImageUpload, JobDir
from trainer_service.training.captions import caption_from_filename
from trainer_service.training.faces import face_detector_problem

MAX_IMAGES = 200
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_CAPTION_CHARS = 1000
MIN_IMAGE_SIDE = 8
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class JobSpec:
    request_id: str
    config: TrainingConfig
    images: list[ImageUpload] = field(default_factory=list)


def validate(spec: JobSpec) -> None:
    """Raise InvalidArgument naming every bad field of the request."""
    v = Violations()
    if spec.request_id:
        v.check(
            bool(_REQUEST_ID.match(spec.request_id)),
            "request_id",
            "1-128 characters of letters, digits and ._:-",
        )
    v.check(bool(spec.images), "instance_images", "give at least one instance image")
    v.check(
        len(spec.images) <= MAX_IMAGES, "instance_images", f"at most {MAX_IMAGES} images per job"
    )
    for i, image in enumerate(spec.images[:MAX_IMAGES]):
        name = f"instance_images[{i}]"
        if len(image.data) > MAX_IMAGE_BYTES:
            v.add(f"{name}.data", f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
            continue
        try:
            decoded = decode_image(image.data)
        except ValueError as err:
            v.add(f"{name}.data", str(err))
            continue
        if min(decoded.size) < MIN_IMAGE_SIDE:
            v.add(f"{name}.data", f"{decoded.width}x{decoded.height} is too small")
        v.check(
            len(image.caption) <= MAX_CAPTION_CHARS,
            f"{name}.caption",
            f"at most {MAX_CAPTION_CHARS} characters",
        )
        _check_mask(v, name, image, decoded.size, spec.config)
    spec.config.validate(v, prefix="config.")
    v.raise_if_any()
    # A folder (or a hub model in the local cache) of a family we cannot train: say so now.
    model = resolve_model(spec.config.pretrained_model_name_or_path)
    family = families.require_served(model, "trainer", local_only=True)
    if family is not None and spec.config.method not in family.methods:
        raise InvalidArgument(
            f"{family.title} models train with {', '.join(sorted(family.methods))} only "
            "(docs/families.md says why)", "config.method",
        )  # fmt: skip
    refused = family.objective_refusal(spec.config.objective_options) if family else None
    if refused is not None:
        option, why = refused
        raise InvalidArgument(f"{family.title}: {option} {why}", f"config.{option}")
    if spec.config.use_face_segmentation_condition and not all(i.mask for i in spec.images):
        problem = face_detector_problem()
        if problem is not None:
            raise FailedPrecondition(problem)


def _check_mask(
    v: Violations, name: str, image: ImageUpload, size: tuple[int, int], config: TrainingConfig
) -> None:
    if config.use_mask_captioned_data:
        v.check(bool(image.mask), f"{name}.mask", "use_mask_captioned_data needs each image's mask")
        v.check(
            bool(image.caption.strip() or caption_from_filename(image.filename)),
            f"{name}.caption",
            "use_mask_captioned_data needs every image's caption (or a file name to read one from)",
        )
    if not image.mask:
        return
    if len(image.mask) > MAX_IMAGE_BYTES:
        v.add(f"{name}.mask", f"larger than {MAX_IMAGE_BYTES // 2**20} MiB")
        return
    try:
        mask = decode_image(image.mask, mode="L")
    except ValueError as err:
        v.add(f"{name}.mask", str(err))
        return
    v.check(
        mask.size == size,
        f"{name}.mask",
        f"is {mask.width}x{mask.height}; give a mask the image's size, {size[0]}x{size[1]}",
    )


def create_job(
    store: JobStore, jobs_dir: Path, spec: JobSpec, objects: ObjectStore | None = None
) -> tuple[JobRecord, bool]:
    """Validate, then write the job folder (and publish it to the artifact store, where any
    replica can fetch it) and queue the job. Idempotent on request_id."""
    if spec.request_id:
        existing = store.job_by_request(spec.request_id)
        if existing is not None:
            return existing, False
    validate(spec)
    job_id = "job-" + uuid.uuid4().hex[:16]
    job_dir = JobDir(jobs_dir / job_id)
    try:
        job_dir.create(spec.config, spec.images)
        if objects is not None:
            job_dir.publish_inputs(objects)
        job, created = store.create_job(
            request_id=spec.request_id, method=spec.config.method,
            base_model=spec.config.pretrained_model_name_or_path,
            tokens=spec.config.learned_tokens, num_images=len(spec.images),
            config=spec.config.to_dict(), job_id=job_id, request_trace=REQUEST_ID.get(),
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(job_dir.path, ignore_errors=True)
        raise
    if not created:  # a concurrent request with the same request_id won
        shutil.rmtree(job_dir.path, ignore_errors=True)
    return job, created
