"""What a fetched adapter file must be, and how a fetch refusal says which rule refused it:
a safetensors header read before the body (JSON, known dtypes, tensors that tile the data,
the size it declares), the pinned digest, the source's HTTP status or hub error mapped to a
gRPC status. Pure checks, used by fetching.py for every source."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from inference_service.references import Reference
from loraforge_core.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)

CHUNK = 1 << 20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
    "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def refusal(kind: type[ServiceError], rule: str, message: str) -> ServiceError:
    """An error that names the rule that refused (the gRPC status carries it as ErrorInfo)."""
    err = kind(f"{message} [{rule}]")
    err.reason = rule
    return err


def safetensors_size(head: bytes, ref: Reference) -> int | None:
    """The file's whole size as its header declares it, once ``head`` holds the header (None
    until then); refused when the header is not a safetensors one."""
    if len(head) < 8:
        return None
    length = int.from_bytes(head[:8], "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise bad_header(ref, f"its first 8 bytes give a header of {length} bytes")
    if len(head) < 8 + length:
        return None
    try:
        header = json.loads(head[8 : 8 + length])
    except ValueError:
        raise bad_header(ref, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad_header(ref, "its header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        spans = sorted(_span(info) for info in tensors.values())
    except (TypeError, ValueError, KeyError) as err:
        raise bad_header(ref, f"a tensor's entry is malformed ({err})") from None
    end = 0
    for start, stop in spans:
        if start != end:
            raise bad_header(ref, "its tensors' data do not follow each other")
        end = stop
    if not spans:
        raise bad_header(ref, "it holds no tensors")
    return 8 + length + end


def _span(info: dict) -> tuple[int, int]:
    start, stop = info["data_offsets"]
    shape = info["shape"]
    if not all(isinstance(n, int) and n >= 0 for n in [start, stop, *shape]):
        raise ValueError("offsets and shape are natural numbers")
    if stop - start != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
        raise ValueError(f"offsets {start}..{stop} do not hold shape {shape}")
    return start, stop


def read_header(ref: Reference, size: int | None, first_bytes: Callable[[int], bytes]) -> int:
    """The whole size the header declares, read through ``first_bytes(n)`` (the file's first
    n bytes, fewer where it is shorter) before any of the body; checked against ``size``."""
    head = first_bytes(min(size or 65536, 65536))
    while (total := safetensors_size(head, ref)) is None:
        more = first_bytes(8 + int.from_bytes(head[:8], "little") if len(head) >= 8 else 8)
        if len(more) <= len(head):
            raise bad_header(ref, f"it ends within its header, after {len(head)} bytes")
        head = more
    matches(ref, total, size)
    return total


def matches(ref: Reference, total: int, declared: int | None) -> None:
    if declared is not None and declared != total:
        raise bad_header(ref, f"its header makes it {total} bytes; the server says {declared}")


def bad_header(ref: Reference, why: str) -> ServiceError:
    return refusal(FailedPrecondition, "NOT_SAFETENSORS",
                   f"{ref.text} is not a safetensors file: {why}")  # fmt: skip


def declared_size(response) -> int | None:
    """The whole file's size from a 200's Content-Length or a 206's Content-Range."""
    if response.status_code == 206:
        whole = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(whole) if whole.isdigit() else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def raise_for_status(status: int, url: str) -> None:
    if status in (200, 206):
        return
    where = urlsplit(url)._replace(query="").geturl()
    if status == 404:
        raise NotFound("adapter file", where, "the server answered 404")
    if status in (401, 403):
        raise refusal(PermissionDenied, "UPSTREAM_DENIED",
                      f"{where} answered {status}: give this server a token for its host "
                      "(LORAFORGE_ADAPTER_TOKENS)")  # fmt: skip
    raise refusal(Unavailable, "UPSTREAM_ERROR", f"{where} answered {status}")


def check_pin(ref: Reference, digest: str) -> None:
    if ref.sha256 and digest != ref.sha256:
        raise refusal(
            FailedPrecondition, "SHA256_MISMATCH",
            f"{ref.text}: the file's sha256 is {digest}, the reference pins {ref.sha256}",
        )  # fmt: skip


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def hub_refusal(ref: Reference, err: Exception) -> ServiceError:
    from huggingface_hub import errors as hub_errors

    if isinstance(err, (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError,
                        hub_errors.EntryNotFoundError)):  # fmt: skip
        return NotFound("hub file", ref.text, type(err).__name__)
    if isinstance(err, hub_errors.GatedRepoError) or "401" in str(err) or "403" in str(err):
        return refusal(PermissionDenied, "UPSTREAM_DENIED",
                       f"{ref.text}: the hub denied access; set HF_TOKEN")  # fmt: skip
    if isinstance(err, (hub_errors.SafetensorsParsingError, hub_errors.NotASafetensorsRepoError)):
        return bad_header(ref, str(err).splitlines()[0])
    return refusal(Unavailable, "UPSTREAM_ERROR", f"{ref.text}: {type(err).__name__}: {err}")
