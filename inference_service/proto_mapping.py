"""The Generator contract's messages mapped to and from the domain: a GenerateRequest to a
``GenerationSpec`` (with the server's defaults), images and adapters to protobuf. The servicer
(server.py) calls these and nothing else touches protobuf on the generator's side."""

from __future__ import annotations

import random

from loraforge.v1 import common_pb2, generator_pb2

from inference_service.adapter_sources import AdapterEntry
from inference_service.references import adapter_id_for, is_reference, parse_reference
from inference_service.spec import (
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    MAX_INPUT_IMAGE_BYTES,
    AdapterRequest,
    GeneratedImage,
    GenerationSpec,
    validate_adapter_id,
    validate_spec,
)
from loraforge_core.errors import InvalidArgument
from loraforge_core.evaluation import to_proto as evaluation_to_proto
from loraforge_core.images import decode_image
from loraforge_core.proto_enums import enum_names, enum_numbers

SCHEDULER_NAMES = enum_names(generator_pb2.Scheduler, "SCHEDULER_", DEFAULT_SCHEDULER)
FORMATS = enum_names(common_pb2.ImageFormat, "IMAGE_FORMAT_", "png")
FORMAT_TO_PROTO = enum_numbers(common_pb2.ImageFormat, "IMAGE_FORMAT_")


def spec_from_request(request: generator_pb2.GenerateRequest) -> GenerationSpec:
    if request.scheduler not in SCHEDULER_NAMES:
        raise InvalidArgument(f"unknown scheduler {request.scheduler}", "scheduler")
    if request.output_format not in FORMATS:
        raise InvalidArgument(f"unknown format {request.output_format}", "output_format")
    init, mask = _image(request.init_image, "init_image"), _image(request.mask_image, "mask_image")
    spec = GenerationSpec(
        prompt=request.prompt, negative_prompt=request.negative_prompt,
        width=request.width or _multiple_of_8(init, 0), height=request.height or
        _multiple_of_8(init, 1), steps=request.num_inference_steps or DEFAULT_STEPS,
        guidance_scale=request.guidance_scale if request.HasField("guidance_scale") else None,
        max_sequence_length=request.max_sequence_length,
        scheduler=SCHEDULER_NAMES[request.scheduler],
        seed=request.seed if request.HasField("seed") else random.randrange(2**31),
        num_images=request.num_images or 1, output_format=FORMATS[request.output_format],
        adapters=[_adapter(a, f"adapters[{i}]") for i, a in enumerate(request.adapters)],
        init_image=init, mask_image=mask.convert("L") if mask is not None else None,
        strength=request.strength if request.HasField("strength") else None,
    )  # fmt: skip
    validate_spec(spec)
    return spec


def _adapter(ref: generator_pb2.AdapterRef, field_name: str) -> AdapterRequest:
    adapter_id = ref.adapter_id
    if ref.source:  # named by reference: served under a name of its own unless given one
        adapter_id = adapter_id or adapter_id_for(parse_reference(ref.source, field_name))
    return AdapterRequest(
        adapter_id, ref.scale if ref.HasField("scale") else 1.0,
        ref.text_encoder_scale if ref.HasField("text_encoder_scale") else None,
        ref.use_recommended_scale, ref.source,
    )  # fmt: skip


def _image(data: bytes, field_name: str):
    """A request's image, decoded (RGB), or None when it sent none."""
    if not data:
        return None
    if len(data) > MAX_INPUT_IMAGE_BYTES:
        raise InvalidArgument(f"larger than {MAX_INPUT_IMAGE_BYTES // 2**20} MiB", field_name)
    try:
        return decode_image(data)
    except ValueError as err:
        raise InvalidArgument(str(err), field_name) from None


def _multiple_of_8(image, axis: int) -> int:
    """An init image's width (axis 0) or height rounded down to a multiple of 8; 0: none."""
    return 0 if image is None else max(8, image.size[axis] // 8 * 8)


def adapter_to_proto(entry: AdapterEntry) -> generator_pb2.AdapterInfo:
    info = generator_pb2.AdapterInfo(
        adapter_id=entry.adapter_id, rank=entry.rank, tokens=entry.tokens,
        size_bytes=entry.size_bytes, sha256=entry.sha256, resident=entry.resident,
        pinned=entry.pinned, source_format=entry.source_format,
        has_text_encoder=entry.has_text_encoder, family=entry.family, source=entry.source,
        source_sha256=entry.source_sha256,
    )  # fmt: skip
    if entry.evaluation is not None:
        evaluation_to_proto(entry.evaluation, info.evaluation)
    return info


def images_to_proto(images: list[GeneratedImage]) -> list[common_pb2.Image]:
    return [
        common_pb2.Image(data=i.data, format=FORMAT_TO_PROTO[i.format], width=i.width,
                         height=i.height, seed=i.seed)
        for i in images
    ]  # fmt: skip


def adapter_source(request: generator_pb2.LoadAdapterRequest) -> dict:
    """The LoadAdapter request's adapter id and source as ``AdapterRegistry.register``'s
    arguments; a reference with no id is named as Generate names it."""
    source = request.WhichOneof("source")
    if source is None:
        raise InvalidArgument(
            "give a reference, a uri in the artifact store or the file's bytes", "source"
        )
    adapter_id = request.adapter_id
    if source == "uri" and is_reference(request.uri):
        adapter_id = adapter_id or adapter_id_for(parse_reference(request.uri, "uri"))
    validate_adapter_id(adapter_id, "adapter_id")
    return {
        "adapter_id": adapter_id, "data": request.data if source == "data" else None,
        "uri": request.uri if source == "uri" else "", "pin": request.pin,
    }  # fmt: skip
