"""The artifact bundle: a LoRA, its learned token embeddings and a manifest, in one folder.

Layout (docs/artifact-format.md):

    pytorch_lora_weights.safetensors   diffusers keys; a stock ``load_lora_weights(folder)`` works
    learned_embeds.safetensors         {token: embedding}; ``load_textual_inversion`` works
    manifest.json                      base model, method, tokens, rank, targets, config,
                                       step, and the sha256 of every file

Bundles are immutable and content-addressed: the id is derived from the manifest's sha256,
which covers every file. Only safetensors are ever read; no pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge_core import families
from loraforge_core.files import fsync_dir

if TYPE_CHECKING:
    import torch

FORMAT = "loraforge.lora-bundle"
FORMAT_VERSION = 1
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "learned_embeds.safetensors"
MANIFEST_FILE = "manifest.json"
BUNDLE_FILES = (LORA_FILE, EMBEDDINGS_FILE, MANIFEST_FILE)
MAX_ARCHIVE_BYTES = 2 * 1024**3


class BundleError(ValueError):
    """A bundle that is malformed, corrupt or does not match what it claims."""


@dataclass
class Manifest:
    base_model: str
    method: str
    tokens: list[str]
    rank: int  # the weights carry alpha / rank folded in (lora_format.py): read at alpha == rank
    unet_target_modules: list[str]
    text_encoder_target_modules: list[str]
    global_step: int
    # Shapes that must match the serving model: text hidden size, UNet cross-attention dim.
    text_hidden_size: int
    cross_attention_dim: int
    training_config: dict[str, Any] = field(default_factory=dict)
    base_model_revision: str = ""
    family: str = "sd"  # loraforge_core.families: the model family it was made for
    # loraforge_core.evaluation.Evaluation as a dict: the training checkpoint's measured
    # strength (empty: not evaluated)
    evaluation: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        # "alpha": format-1 readers require it, and it is the rank by construction.
        return json.dumps({**asdict(self), "alpha": float(self.rank)}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BundleError(f"manifest.json is not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BundleError(f"manifest.json is not a {FORMAT} manifest")
        _check_field_types(data)
        if data.get("alpha", data.get("rank")) != data.get("rank"):
            raise BundleError(
                "manifest.json: alpha must equal rank (the weights carry alpha "
                "folded in); import other LoRA files with `loraforge-trainer import`"
            )
        known_families = [f.name for f in families.FAMILIES]
        if data.get("family", "sd") not in known_families:
            raise BundleError(
                f"bundle made for model family {data['family']!r}, which this loraforge does "
                f"not know ({known_families}); upgrade loraforge"
            )
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(
                f"bundle format version {data['format_version']} is newer than this server's "
                f"({FORMAT_VERSION}); upgrade loraforge"
            )
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise BundleError(f"manifest.json is missing fields: {err}") from err


# JSON types of the manifest fields (bool is an int in Python: refused apart).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "base_model": str, "method": str, "tokens": list, "rank": int, "alpha": (int, float),
    "unet_target_modules": list, "text_encoder_target_modules": list, "global_step": int,
    "text_hidden_size": int, "cross_attention_dim": int, "training_config": dict,
    "base_model_revision": str, "family": str, "evaluation": dict, "files": dict, "format": str,
    "format_version": int,
}  # fmt: skip
_STRING_LISTS = ("tokens", "unet_target_modules", "text_encoder_target_modules")


def _check_field_types(data: dict[str, Any]) -> None:
    for name, expected in _FIELD_TYPES.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, expected):
            raise BundleError(f"manifest.json: {name} has the wrong type")
        if name in _STRING_LISTS and not all(isinstance(v, str) for v in value):
            raise BundleError(f"manifest.json: {name} must be a list of strings")
    if not all(isinstance(v, dict) for v in data.get("files", {}).values()):
        raise BundleError("manifest.json: files maps names to {sha256, size}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_id(manifest_text: str) -> str:
    return "lora-" + hashlib.sha256(manifest_text.encode()).hexdigest()[:24]


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    id: str

    @property
    def lora_path(self) -> Path:
        return self.path / LORA_FILE

    @property
    def embeddings_path(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    def size_bytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in BUNDLE_FILES)

    def sha256(self) -> str:
        return sha256_file(self.path / MANIFEST_FILE)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.lora_path)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The embeddings file as stored (see ``token_vectors`` for its meaning)."""
        from safetensors.torch import load_file

        return load_file(self.embeddings_path)

    def token_vectors(self) -> dict[str, list[torch.Tensor]]:
        """Each learned token's vectors, one per text encoder of the bundle's family. An SD
        embeddings file maps each token to its vector; an SDXL one holds ``clip_l`` and
        ``clip_g`` matrices with a row per token in the manifest's order (the layout of SDXL
        embedding files in A1111, ComfyUI and diffusers' training scripts)."""
        stored = self.embeddings()
        keys = families.by_name(self.manifest.family).embedding_keys
        if keys == ("",):
            return {token: [vector.reshape(-1)] for token, vector in stored.items()}
        return {token: [stored[key][row] for key in keys]
                for row, token in enumerate(self.manifest.tokens)}  # fmt: skip


def write_bundle(
    dest: Path,
    lora_state: dict[str, torch.Tensor],
    embeddings: dict[str, torch.Tensor],
    manifest: Manifest,
) -> Bundle:
    """Write a bundle folder atomically (staged beside ``dest``, then renamed into place)."""
    from safetensors.torch import save

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        metadata = {"format": "pt", "loraforge.tokens": json.dumps(manifest.tokens)}
        manifest.files = {}
        for name, state in ((LORA_FILE, lora_state), (EMBEDDINGS_FILE, embeddings)):
            data = _canonical_header(save(_contiguous(state), metadata=metadata))
            (staging / name).write_bytes(data)
            manifest.files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        text = manifest.to_json()
        (staging / MANIFEST_FILE).write_text(text)
        for name in BUNDLE_FILES:
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        fsync_dir(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Bundle(dest, manifest, bundle_id(text))


def _canonical_header(data: bytes) -> bytes:
    """The safetensors bytes with the header's keys sorted. safetensors writes its metadata map
    in hash order, which differs from one write to the next, so the same tensors would get
    another sha256 (and the bundle another id). Data offsets count from the end of the
    header, so only the header changes (padded with spaces to 8 bytes, as safetensors does)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def read_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Open a bundle folder; with ``verify``, check every file against the manifest's sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a bundle: no {MANIFEST_FILE}")
    text = manifest_path.read_text()
    manifest = Manifest.from_json(text)
    for name in (LORA_FILE, EMBEDDINGS_FILE):
        file = path / name
        if not file.is_file():
            raise BundleError(f"bundle {path.name} lacks {name}")
        if verify:
            expected = manifest.files.get(name, {}).get("sha256")
            if expected != sha256_file(file):
                raise BundleError(f"bundle {path.name}: {name} does not match its sha256")
    if verify:
        _check_tokens(path, manifest)
    return Bundle(path, manifest, bundle_id(text))


def _check_tokens(path: Path, manifest: Manifest) -> None:
    """The manifest's tokens are exactly the embeddings file's, one vector each (per text
    encoder: ``Bundle.token_vectors``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path / EMBEDDINGS_FILE, "pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise BundleError(f"bundle {path.name}: unreadable {EMBEDDINGS_FILE}: {err}") from err
    keys = families.by_name(manifest.family).embedding_keys
    if keys != ("",):
        _check_token_matrices(path, manifest, shapes, keys)
        return
    if sorted(shapes) != sorted(manifest.tokens) or len(set(manifest.tokens)) != len(shapes):
        raise BundleError(
            f"bundle {path.name}: manifest tokens {manifest.tokens} are not the embeddings' "
            f"{sorted(shapes)}"
        )
    for token, shape in shapes.items():
        if list(shape) not in ([manifest.text_hidden_size], [1, manifest.text_hidden_size]):
            raise BundleError(
                f"bundle {path.name}: embedding {token!r} has shape {shape}, not "
                f"[{manifest.text_hidden_size}]"
            )


def _check_token_matrices(
    path: Path, manifest: Manifest, shapes: dict[str, list[int]], keys: tuple[str, ...]
) -> None:
    """A row per token in one matrix per text encoder (the first as wide as the manifest's
    text hidden size)."""
    tokens = len(manifest.tokens)
    if not tokens and not shapes:
        return
    if sorted(shapes) != sorted(keys) or len(set(manifest.tokens)) != tokens:
        raise BundleError(
            f"bundle {path.name}: {manifest.family} embeddings hold {list(keys)}, "
            f"one row per token of {manifest.tokens}; this one has {sorted(shapes)}"
        )
    for key in keys:
        shape = list(shapes[key])
        width = manifest.text_hidden_size if key == keys[0] else None
        if len(shape) != 2 or shape[0] != tokens or (width and shape[1] != width):
            raise BundleError(
                f"bundle {path.name}: embeddings {key!r} have shape {shape}, not "
                f"[{tokens}, {width or 'hidden size'}]"
            )


def pack(path: Path) -> bytes:
    """A bundle folder as one uncompressed tar archive (safetensors do not compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in BUNDLE_FILES:
            info = archive.gettarinfo(str(Path(path) / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(Path(path) / name, "rb") as handle:
                archive.addfile(info, handle)
    return buffer.getvalue()


def is_archive(data: bytes) -> bool:
    return len(data) > 262 and data[257:262] == b"ustar"


def unpack(data: bytes, dest: Path) -> Bundle:
    """Extract a bundle archive into ``dest`` (atomically) and verify it.

    Only the three bundle files are accepted, as regular files at the top level: no links,
    no paths, nothing else.
    """
    if len(data) > MAX_ARCHIVE_BYTES:
        raise BundleError("bundle archive is larger than 2 GiB")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
                members = archive.getmembers()
                names = [m.name for m in members]
                if sorted(names) != sorted(BUNDLE_FILES) or not all(m.isfile() for m in members):
                    raise BundleError(
                        f"a bundle archive holds exactly {', '.join(BUNDLE_FILES)} as plain "
                        f"files; this one holds {names}"
                    )
                for member in members:
                    source = archive.extractfile(member)
                    assert source is not None
                    (staging / member.name).write_bytes(source.read())
        except tarfile.TarError as err:
            raise BundleError(f"not a readable bundle archive: {err}") from err
        bundle = read_bundle(staging)
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
        return Bundle(dest, bundle.manifest, bundle.id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def store_bundle(
    root: Path,
    lora_state: dict[str, torch.Tensor],
    embeddings: dict[str, torch.Tensor],
    manifest: Manifest,
) -> Bundle:
    """Write a bundle into a content-addressed store: ``root/<bundle id>/``.

    An identical bundle already stored is kept as it is (bundles are immutable).
    """
    root = Path(root)
    pending = write_bundle(
        root / f".pending-{os.getpid()}-{manifest.global_step}", lora_state, embeddings, manifest
    )
    final = root / pending.id
    if final.exists():
        shutil.rmtree(pending.path)
    else:
        pending.path.rename(final)
        fsync_dir(root)
    return Bundle(final, pending.manifest, pending.id)
