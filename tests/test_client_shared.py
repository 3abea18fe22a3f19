"""What the sync and asyncio clients share: retries, stream resumption, enum names."""

from __future__ import annotations

import asyncio

import pytest
from loraforge.v1 import generator_pb2, trainer_pb2
from loraforge_client import AsyncTrainerClient, TrainerClient, UnavailableError
from loraforge_client import enums as client_enums
from loraforge_client._common import WatchCursor

from inference_service import spec
from inference_service.proto_mapping import SCHEDULER_NAMES
from loraforge_core.launch import free_port


class Counting:
    """Counts the calls that reach a real stub method."""

    def __init__(self, method) -> None:
        self.method, self.calls = method, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.method(*args, **kwargs)


def test_both_twins_retry_a_server_that_is_down_then_raise_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    with TrainerClient(target, retries=2, timeout=5) as client:
        client.stub.GetJob = Counting(client.stub.GetJob)
        with pytest.raises(UnavailableError):
            client.get_job("job-1")
        assert client.stub.GetJob.calls == 3

    async def async_calls() -> int:
        async with AsyncTrainerClient(target, retries=2, timeout=5) as client:
            client.stub.GetJob = Counting(client.stub.GetJob)
            with pytest.raises(UnavailableError):
                await client.get_job("job-1")
            return client.stub.GetJob.calls

    assert asyncio.run(async_calls()) == 3


def test_a_watch_resumes_after_the_last_event_and_skips_repeats() -> None:
    cursor = WatchCursor("job-1", after_sequence=2, reconnect_for=60)
    assert cursor.request().after_sequence == 2

    def event(sequence: int) -> trainer_pb2.JobEvent:
        message = trainer_pb2.JobEvent(job_id="job-1", sequence=sequence)
        message.log.message = f"event {sequence}"
        return message

    seen = [cursor.accept(event(s)) for s in (2, 3, 4, 4)]
    assert [e.sequence if e else None for e in seen] == [None, 3, 4, None]
    assert cursor.request().after_sequence == 4


def test_the_client_knows_every_choice_the_services_accept() -> None:
    assert set(client_enums.SCHEDULERS) == set(spec.SCHEDULERS) == set(SCHEDULER_NAMES.values())
    assert set(client_enums.IMAGE_FORMATS) == set(spec.IMAGE_FORMATS)
    assert client_enums.SCHEDULERS["default"] == generator_pb2.SCHEDULER_UNSPECIFIED
    assert client_enums.JOB_STATES["cancelled"] == trainer_pb2.JOB_STATE_CANCELLED
