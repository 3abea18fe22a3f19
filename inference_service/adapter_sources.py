"""Where adapters come from: pushed bytes, the artifact store, or a reference (hf://,
https://, s3://: references.py, fetched by fetching.py), turned into bundle folders.

A pushed bundle archive is unpacked under ``adapters/<id>``; a pushed, stored or fetched LoRA
file in any supported format (kohya/A1111, diffusers/peft, cloneofsimo) is converted into a
bundle there (loraforge_core.interop); a bundle in the artifact store is read where it lies.
The result is an ``AdapterEntry``: what the server knows of an adapter, resident or not.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference_service.fetching import FetchPolicy, RemoteAdapters
from inference_service.references import Reference, is_reference, parse_reference
from inference_service.spec import is_adapter_id, learned_token_problem
from loraforge_core import bundle as bundles
from loraforge_core import families, interop
from loraforge_core.artifacts import ARTIFACTS, BundleCache
from loraforge_core.errors import FailedPrecondition, InvalidArgument, NotFound
from loraforge_core.evaluation import Evaluation
from loraforge_core.files import atomic_write_bytes, safe_child
from loraforge_core.objectstore import ObjectStore


@dataclass
class AdapterEntry:
    adapter_id: str
    source_format: str  # bundle, or what it was imported from: kohya | diffusers | ...
    path: Path
    tokens: list[str]
    embeddings: dict[str, list[torch.Tensor]]  # token -> its vector per text encoder
    rank: int
    size_bytes: int
    sha256: str
    has_lora: bool
    has_text_encoder: bool
    family: str  # loraforge_core.families name
    evaluation: Evaluation | None = None  # the training checkpoint's, where it was scored
    pinned: bool = False
    resident: bool = False
    peft_name: str = ""  # the name its weights have in the peft layers (a slot, or its own)
    token_map: dict[str, str] = field(default_factory=dict)  # learned token -> private name
    # Where it came from: a reference (its canonical text), "upload", or "store:<path>"; and
    # the sha256 of the file as it came (what a reference's #sha256= pins), where one came.
    source: str = ""
    source_sha256: str = ""

    def serves(self, reference: Reference) -> bool:
        """Whether this adapter is what ``reference`` names (and pins, where it pins)."""
        return self.source == reference.text and reference.sha256 in ("", self.source_sha256)

    @property
    def recommended_scale(self) -> float:
        """What ``use_recommended_scale`` multiplies: the evaluation's, else 1."""
        return self.evaluation.recommended_scale if self.evaluation else 1.0


DEFAULT_CACHE_BYTES = 20 * 2**30


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header = int.from_bytes(data[:8], "little")
    return 0 < header < len(data) and data[8:9] == b"{"


class AdapterSources:
    """Adapter sources under ``data_dir`` (the generator's ``--data-dir``)."""

    def __init__(
        self, pipe: Any, data_dir: Path, model_name: str = "",
        after_import: Callable[[], None] = lambda: None, *,
        objects: ObjectStore | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
        in_use: Callable[[], set[Path]] = set, remote: RemoteAdapters | None = None,
    ) -> None:  # fmt: skip
        self.pipe = pipe  # imports check the file against the model's architecture
        self.model_name = model_name
        self.after_import = after_import  # an import loads and drops a temporary adapter
        self.data_dir = Path(data_dir)
        self.adapters_dir = self.data_dir / "adapters"
        # A remote artifact store: bundles are fetched by id into data_dir/artifacts, which
        # is then a cache bounded by cache_bytes (adapters in use are never dropped).
        self.cache = None
        if objects is not None and objects.local_root is None:
            self.cache = BundleCache(objects, self.data_dir / "artifacts", cache_bytes, in_use)
        # References: none allowed unless the operator's policy says (fetching.FetchPolicy).
        self.remote = remote or RemoteAdapters(FetchPolicy(), self.data_dir / "adapter-cache")
        self.family = families.of_pipeline(pipe)
        self.text_hidden = int(pipe.text_encoder.config.hidden_size)
        self.cross_dim = self.family.conditioning_dim(getattr(pipe, self.family.denoiser))

    def open(self, adapter_id: str, *, data: bytes | None = None, uri: str = "") -> AdapterEntry:
        """The adapter from inline bytes, else from ``uri``: a reference, or a path (or its
        id) in the artifact store."""
        if data is not None:
            entry = self._from_bytes(adapter_id, data)
            entry.source, entry.source_sha256 = "upload", hashlib.sha256(data).hexdigest()
        elif is_reference(uri):
            reference = parse_reference(uri, "uri")
            fetched = self.remote.fetch(reference, again=True)  # cached by fetch(), first
            entry = self._import(adapter_id, fetched.path, "uri")
            entry.source, entry.source_sha256 = reference.text, fetched.sha256
        else:
            entry = self._from_store(adapter_id, uri or adapter_id)
            entry.source = f"store:{uri or adapter_id}"
        return entry

    def _from_bytes(self, adapter_id: str, data: bytes) -> AdapterEntry:
        folder = safe_child(self.adapters_dir, adapter_id)
        if bundles.is_archive(data):
            try:
                bundles.unpack(data, folder)
            except bundles.BundleError as err:
                raise InvalidArgument(str(err), "data") from err
            return self._from_bundle(adapter_id, folder)
        if _is_safetensors(data):
            upload = self.adapters_dir / ".uploads" / f"{adapter_id}.safetensors"
            atomic_write_bytes(upload, data)
            try:
                return self._import(adapter_id, upload)
            finally:
                upload.unlink(missing_ok=True)
        raise InvalidArgument(
            "give a bundle archive or a LoRA .safetensors file (no pickle)", "data"
        )

    def fetch(self, adapter_id: str, uri: str = "") -> None:
        """Download what ``uri`` names (a reference), or a remote store's bundle that ``uri``
        (or the id) points to, into the local cache if it is not there yet. Touches no model:
        the generator calls it off the pipeline thread, so a download stalls only the
        requests that need it."""
        if is_reference(uri):
            self.remote.fetch(parse_reference(uri, "uri"))
        else:
            self._stored_path(uri or adapter_id)

    def _stored_path(self, uri: str) -> Path:
        """Where a store path lies on this server's disk, fetched into the cache when it is a
        bundle id in a remote store; a bare id also finds the trainer's ``artifacts/<id>``."""
        relative = uri.removeprefix("file://")
        try:
            path = safe_child(self.data_dir, relative)
            if not path.exists() and "/" not in relative:
                path = safe_child(self.data_dir / "artifacts", relative)
        except ValueError as err:
            raise InvalidArgument(str(err), "uri") from err
        if not path.exists() and self.cache is not None:
            bundle_id = relative.removeprefix(ARTIFACTS)
            if is_adapter_id(bundle_id):  # a bundle id: fetch it into the cache
                try:
                    path = self.cache.get(bundle_id) or path
                except bundles.BundleError as err:
                    raise InvalidArgument(
                        f"bundle {bundle_id} in the artifact store: {err}", "uri"
                    ) from err
        return path

    def _from_store(self, adapter_id: str, uri: str) -> AdapterEntry:
        relative = uri.removeprefix("file://")
        path = self._stored_path(uri)
        if (path / bundles.MANIFEST_FILE).is_file():
            try:
                return self._from_bundle(adapter_id, path, "uri")
            except bundles.BundleError as err:
                raise InvalidArgument(str(err), "uri") from err
        if path.is_file() and path.suffix == ".safetensors":
            return self._import(adapter_id, path)
        raise NotFound("adapter", adapter_id, f"nothing loadable at {relative!r} in the store")

    def _import(self, adapter_id: str, source: Path, field_name: str = "data") -> AdapterEntry:
        """A LoRA file in any supported format -> a bundle under adapters/<id>."""
        folder = safe_child(self.adapters_dir, adapter_id)
        try:
            bundle = interop.import_file(
                source, self.pipe, self.adapters_dir / ".imports", base_model=self.model_name
            )
        except interop.ArchitectureMismatch as err:
            raise FailedPrecondition(f"adapter {adapter_id!r}: {err}") from err
        except interop.FormatError as err:
            raise InvalidArgument(str(err), field_name) from err
        finally:
            self.after_import()
        shutil.rmtree(folder, ignore_errors=True)
        bundle.path.rename(folder)
        return self._from_bundle(adapter_id, folder)

    def _from_bundle(self, adapter_id: str, path: Path, field_name: str = "data") -> AdapterEntry:
        bundle = bundles.read_bundle(path)
        manifest = bundle.manifest
        for token in manifest.tokens:
            if problem := learned_token_problem(token):
                raise InvalidArgument(f"adapter {adapter_id!r}: {problem}", field_name)
        if manifest.family != self.family.name:
            raise FailedPrecondition(
                f"adapter {adapter_id!r} was made for {manifest.family!r} models; this server "
                f"serves {self.family.title} ({self.family.name})"
            )
        trained_for = (manifest.text_hidden_size, manifest.cross_attention_dim)
        if trained_for != (self.text_hidden, self.cross_dim):
            raise FailedPrecondition(
                f"adapter {adapter_id!r} was trained for a model with text hidden size "
                f"{manifest.text_hidden_size} and cross-attention dim "
                f"{manifest.cross_attention_dim}; this server's model has {self.text_hidden} "
                f"and {self.cross_dim}"
            )
        from safetensors import safe_open

        with safe_open(bundle.lora_path, "pt") as handle:  # key names only: the weights are
            lora_keys = list(handle.keys())  # read once, when the adapter becomes resident
        source_format = manifest.method.split(":", 1)[1] if ":" in manifest.method else "bundle"
        return AdapterEntry(
            adapter_id=adapter_id, source_format=source_format, path=path,
            tokens=manifest.tokens, embeddings=bundle.token_vectors(), rank=manifest.rank,
            size_bytes=bundle.size_bytes(), sha256=bundle.sha256(), has_lora=bool(lora_keys),
            has_text_encoder=any(k.startswith("text_encoder") for k in lora_keys),
            family=manifest.family,
            evaluation=Evaluation.from_dict(manifest.evaluation) if manifest.evaluation else None,
        )  # fmt: skip
