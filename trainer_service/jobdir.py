"""One job's folder under ``data-dir/jobs/<id>``: what CreateJob stored and what training writes.

images/           the instance images, under safe names
images.json       [{stored_as, filename, caption, mask}] in upload order (mask: its file)
config.json       the job's TrainingConfig
train.log         the training process's stderr
train.lock        held by the job's one training process (an old one may still be stopping)
checkpoints/      training state for resume (training/checkpoint.py)

With a remote artifact store the inputs and checkpoints are also kept at ``jobs/<id>/`` there.
"""

from __future__ import annotations

import fcntl
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from loraforge_core.files import atomic_write_bytes
from loraforge_core.objectstore import ObjectStore
from trainer_service.config import TrainingConfig
from trainer_service.training import checkpoint_name

if TYPE_CHECKING:
    from trainer_service.job_store import ArtifactRecord
    from trainer_service.training.data import InstanceExample


@dataclass
class ImageUpload:
    data: bytes
    filename: str = ""
    caption: str = ""
    mask: bytes = b""  # a loss mask (white = the subject), or none


def _safe_name(index: int, filename: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename).name)[-80:] or "image"
    return f"{index:04d}-{stem}"


class JobDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.images = self.path / "images"
        self.index = self.path / "images.json"
        self.config_file = self.path / "config.json"
        self.log = self.path / "train.log"
        self.lock_file = self.path / "train.lock"
        self.checkpoints = self.path / "checkpoints"

    def create(self, config: TrainingConfig, images: list[ImageUpload]) -> None:
        """Write a new job's images, index and config (each file atomically)."""
        self.images.mkdir(parents=True)
        index = []
        for i, image in enumerate(images):
            stored_as = _safe_name(i, image.filename or f"image-{i}.png")
            atomic_write_bytes(self.images / stored_as, image.data)
            item = {"stored_as": stored_as, "filename": image.filename, "caption": image.caption}
            if image.mask:
                item["mask"] = f"{stored_as}.mask"
                atomic_write_bytes(self.images / item["mask"], image.mask)
            index.append(item)
        atomic_write_bytes(self.index, json.dumps(index).encode())
        atomic_write_bytes(self.config_file, config.to_json().encode())

    # ------------------------------------------------------------------ the artifact store
    # A job's inputs and checkpoints also live at jobs/<id>/ in the artifact store, so that
    # any replica can run or resume it; in the local store that is this very folder.
    @property
    def key(self) -> str:
        return f"jobs/{self.path.name}/"

    def publish_inputs(self, objects: ObjectStore) -> None:
        """Images, then their index, then the config (the config says the inputs are whole)."""
        names = [f"images/{p.name}" for p in sorted(self.images.iterdir())]
        objects.put_files(self.key, self.path, [*names, self.index.name, self.config_file.name])

    def publish_checkpoint(self, objects: ObjectStore, global_step: int, epoch: int) -> str:
        """A checkpoint's resume state into the artifact store; its key. In a remote store
        under the claim's own prefix (``claim-<epoch>/``), so that a replica that lost the
        job cannot overwrite its new owner's state: only a key the job's record names (in a
        transaction fenced by the claim) is ever resumed from."""
        path = self.checkpoints / checkpoint_name(global_step)
        claim = f"claim-{epoch}/" if objects.local_root is None else ""  # local: this file
        key = f"{self.key}checkpoints/{claim}{path.name}"
        objects.put_file(key, path)
        return key

    def fetch_resume_state(self, objects: ObjectStore, record: ArtifactRecord) -> None:
        """A checkpoint's resume state from the artifact store into this job folder (a
        record written before resume keys names the old, shared key)."""
        key = record.resume_key or f"{self.key}checkpoints/{checkpoint_name(record.global_step)}"
        if not objects.get_file(key, self.checkpoints / checkpoint_name(record.global_step)):
            raise FileNotFoundError(f"resume state {key} is not in the artifact store")

    def drop_resume_state(self, objects: ObjectStore | None, record: ArtifactRecord) -> None:
        """A pruned checkpoint's resume state, here and in the artifact store."""
        name = checkpoint_name(record.global_step)
        if objects is not None:
            objects.delete([record.resume_key or f"{self.key}checkpoints/{name}"])
        (self.checkpoints / name).unlink(missing_ok=True)

    def fetch_inputs(self, objects: ObjectStore) -> None:
        """The job's images, their index and its config, where another replica stored them."""
        objects.get_tree(f"{self.key}images/", self.images)
        for path in (self.index, self.config_file):
            objects.get_file(self.key + path.name, path)

    def config(self) -> TrainingConfig:
        return TrainingConfig.from_json(self.config_file.read_text())

    def examples(self) -> list[InstanceExample]:
        """The instance images with their file names, captions and masks, in upload order."""
        from PIL import Image, ImageOps

        from trainer_service.training.data import InstanceExample

        def load(name: str, mode: str) -> Image.Image:
            with Image.open(self.images / name) as image:
                return ImageOps.exif_transpose(image).convert(mode)

        return [
            InstanceExample(
                load(item["stored_as"], "RGB"), item["filename"], item.get("caption", ""),
                load(item["mask"], "L") if item.get("mask") else None,
            )
            for item in json.loads(self.index.read_text())
        ]  # fmt: skip

    def lock(self) -> IO[str]:
        """Hold the job's training lock until the returned file is closed (or the process
        exits); waits while another process holds it."""
        handle = open(self.lock_file, "a+")  # noqa: SIM115 - the caller holds it
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def last_log_line(self) -> str:
        if not self.log.is_file():
            return ""
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
