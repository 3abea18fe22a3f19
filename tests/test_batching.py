"""The batching rules (inference_service/batching.py) without a model or a server."""

from __future__ import annotations

import pytest

from inference_service.batching import BatchQueue, plan
from inference_service.spec import AdapterRequest, GenerationJob, GenerationSpec
from loraforge_core.errors import Cancelled


def spec(steps: int = 10, images: int = 1, adapters: tuple[str, ...] = ()) -> GenerationSpec:
    return GenerationSpec(
        "a red circle", steps=steps, num_images=images,
        adapters=[AdapterRequest(a) for a in adapters],
    )  # fmt: skip


def test_plan_groups_requests_that_share_settings_in_arrival_order() -> None:
    specs = [spec(10), spec(20), spec(10), spec(20), spec(10)]
    assert plan(specs) == [[0, 2, 4], [1, 3]]


def test_plan_keeps_each_batch_within_its_image_and_adapter_budgets() -> None:
    assert plan([spec(images=3), spec(images=3), spec(images=2)], max_images=5) == [[0, 2], [1]]
    by_adapters = [spec(adapters=("a", "b")), spec(adapters=("c",)), spec(adapters=("a",))]
    assert plan(by_adapters, max_adapters=2) == [[0, 2], [1]]
    # A request that alone exceeds a budget still gets a batch.
    assert plan([spec(images=8)], max_images=1) == [[0]]


def test_a_turn_serves_the_oldest_request_with_those_that_fit_its_batch() -> None:
    queue = BatchQueue(max_images=4)
    first = queue.add(GenerationJob(spec(10, images=2)))
    other = queue.add(GenerationJob(spec(20)))
    second = queue.add(GenerationJob(spec(10, images=2)))
    third = queue.add(GenerationJob(spec(10)))
    assert queue.take(first.ticket) == [first, second]
    assert queue.take(other.ticket) == [other]
    # The second request was served on the first's turn; the third waits for its own turn.
    assert queue.take(second.ticket) == []
    assert queue.take(third.ticket) == [third]


def test_an_adapter_operation_splits_the_requests_around_it() -> None:
    queue = BatchQueue()
    before = queue.add(GenerationJob(spec()))
    barrier = queue.add_barrier()
    after = queue.add(GenerationJob(spec()))
    assert queue.take(before.ticket) == [before]
    # The operation has not run yet: a turn that comes earlier than the waiting request
    # serves nothing.
    assert queue.take(barrier - 1) == []
    queue.lift_barrier(barrier)
    assert queue.take(after.ticket) == [after]


def test_a_request_whose_caller_left_is_dropped_with_cancelled() -> None:
    queue = BatchQueue()
    gone = queue.add(GenerationJob(spec(), is_cancelled=lambda: True))
    kept = queue.add(GenerationJob(spec()))
    assert queue.take(kept.ticket) == [kept]
    with pytest.raises(Cancelled):
        gone.result.result(timeout=0)


def test_batching_off_serves_one_request_per_turn() -> None:
    queue = BatchQueue(max_images=1)
    items = [queue.add(GenerationJob(spec())) for _ in range(3)]
    assert [queue.take(item.ticket) for item in items] == [[item] for item in items]
    with pytest.raises(ValueError, match="at least 1"):
        BatchQueue(max_images=0)
