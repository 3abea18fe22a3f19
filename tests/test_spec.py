"""Generate requests: defaults and validation (inference_service/spec.py)."""

from __future__ import annotations

import pytest

from inference_service.spec import (
    MAX_ADAPTERS_PER_REQUEST,
    AdapterRequest,
    GenerationSpec,
    validate_spec,
)
from loraforge_core.errors import InvalidArgument


def violations(**fields) -> set[str]:
    try:
        validate_spec(GenerationSpec(**{"prompt": "a red circle", **fields}))
    except InvalidArgument as err:
        return {v.field for v in err.violations}
    return set()


def test_a_plain_request_is_valid() -> None:
    assert violations() == set()
    assert violations(seed=2**64 - 1) == set()  # one image: the largest seed torch takes


def test_every_image_seed_must_stay_in_torchs_range() -> None:
    assert violations(seed=2**64 - 1, num_images=2) == {"seed"}
    assert violations(seed=2**64 - 4, num_images=4) == set()


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"width": 12}, "width"),
        ({"steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"scheduler": "heun"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"prompt": "a <|lf0|> square"}, "prompt"),
        ({"adapters": [AdapterRequest("a", scale=5.0)]}, "adapters[0].scale"),
        ({"adapters": [AdapterRequest("../x")]}, "adapters[0].adapter_id"),
        ({"adapters": [AdapterRequest("a"), AdapterRequest("a")]}, "adapters"),
    ],
)
def test_each_bad_field_is_named(fields, bad) -> None:
    assert bad in violations(**fields)


def test_the_adapter_limit_is_one_number() -> None:
    adapters = [AdapterRequest(f"a{i}") for i in range(MAX_ADAPTERS_PER_REQUEST + 1)]
    assert violations(adapters=adapters) == {"adapters"}
    assert violations(adapters=adapters[:-1]) == set()
