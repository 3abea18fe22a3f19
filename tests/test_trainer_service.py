"""The Trainer service on loopback with the tiny model: lifecycle, events, artifacts, faults."""

from __future__ import annotations

import functools
import io
import math
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from loraforge.v1 import trainer_pb2, trainer_pb2_grpc

from loraforge_core import forkserver
from loraforge_core.bundle import read_bundle
from loraforge_core.launch import ServerProcess
from tests.helpers import shape_png, write_model_index
from trainer_service.training.zygote import TITLE as ZYGOTE

FAST = dict(max_train_steps_ti=4, max_train_steps_tuning=4, save_steps=2,
            gradient_accumulation_steps=1, learning_rate_unet=1e-2, learning_rate_text=1e-3,
            seed=1)  # fmt: skip


def job_request(
    request_id: str = "", *, images: int = 3, **options
) -> trainer_pb2.CreateJobRequest:
    config = {**FAST, **options}
    return trainer_pb2.CreateJobRequest(
        request_id=request_id,
        method=trainer_pb2.TRAINING_METHOD_PTI,
        placeholder_tokens=["<s1>"],
        initializer_tokens=["circle"],
        template=trainer_pb2.CAPTION_TEMPLATE_OBJECT,
        instance_images=[
            trainer_pb2.InstanceImage(data=shape_png("red", offset=i), filename=f"red_{i}.png")
            for i in range(images)
        ],
        config=trainer_pb2.TrainingConfig(**config),
    )


@pytest.fixture(scope="module")
def trainer(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(
        "trainer", data_dir=tmp_path_factory.mktemp("trainer"), model=str(tiny_model)
    ) as server:
        yield server


@pytest.fixture()
def stub(trainer: ServerProcess) -> Iterator[trainer_pb2_grpc.TrainerStub]:
    with grpc.insecure_channel(trainer.target) as channel:
        yield trainer_pb2_grpc.TrainerStub(channel)


def watch_all(stub, job_id: str, after: int = 0) -> list[trainer_pb2.JobEvent]:
    return list(
        stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=300)
    )


def download(stub, artifact_id: str, dest: Path) -> Path:
    data = b"".join(
        c.data
        for c in stub.DownloadArtifact(
            trainer_pb2.DownloadArtifactRequest(artifact_id=artifact_id, chunk_size=65536),
            timeout=60,
        )
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(dest, filter="data")
    return dest


@pytest.mark.slow
def test_pti_job_streams_ordered_events_and_yields_a_loadable_bundle(
    stub, tiny_model: Path, tmp_path: Path
) -> None:
    job = stub.CreateJob(job_request(validation_prompt="a photo of a <s1>"), timeout=30)
    assert job.state == trainer_pb2.JOB_STATE_QUEUED
    events = watch_all(stub, job.job_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    states = [e.state_change.state for e in events if e.WhichOneof("kind") == "state_change"]
    assert states == [
        trainer_pb2.JOB_STATE_QUEUED,
        trainer_pb2.JOB_STATE_RUNNING,
        trainer_pb2.JOB_STATE_SUCCEEDED,
    ]
    progress = [e.progress for e in events if e.WhichOneof("kind") == "progress"]
    phases = [p.phase for p in progress]
    assert (
        phases
        == [trainer_pb2.TRAINING_PHASE_INVERSION] * 4 + [trainer_pb2.TRAINING_PHASE_TUNING] * 4
    )
    assert [p.global_step for p in progress] == list(range(1, 9))
    assert [p.step for p in progress] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert all(math.isfinite(p.loss) and p.loss > 0 for p in progress)
    checkpoints = [e.checkpoint for e in events if e.WhichOneof("kind") == "checkpoint"]
    assert [c.global_step for c in checkpoints] == [2, 4, 6, 8]
    previews = [e.preview for e in events if e.WhichOneof("kind") == "preview"]
    assert previews and previews[0].image.data.startswith(b"\x89PNG")
    final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED and final.final_artifact_id
    assert list(final.checkpoint_artifact_ids) == [c.artifact_id for c in checkpoints]
    assert final.config.lora_rank == 4 and final.config.learning_rate_unet == pytest.approx(1e-2)

    artifact = stub.GetArtifact(trainer_pb2.GetArtifactRequest(artifact_id=final.final_artifact_id))
    assert list(artifact.tokens) == ["<s1>"] and artifact.global_step == 8
    folder = download(stub, final.final_artifact_id, tmp_path / "bundle")

    # A stock diffusers pipeline loads the bundle and its output changes.
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    embeddings = load_file(folder / "learned_embeds.safetensors")
    assert list(embeddings) == ["<s1>"]
    pipe.load_textual_inversion(list(embeddings.values()), token=list(embeddings))

    def render() -> np.ndarray:
        return pipe(
            "a photo of a <s1>",
            num_inference_steps=4,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    base = render()
    pipe.load_lora_weights(folder, adapter_name="trained")
    assert np.abs(render() - base).mean() > 1e-3


@pytest.mark.slow
def test_an_sdxl_job_trains_with_previews_and_yields_an_sdxl_bundle(
    stub, tiny_sdxl: Path, tmp_path: Path
) -> None:
    request = job_request("sdxl-job", validation_prompt="a photo of a <s1>")
    request.base_model = str(tiny_sdxl)
    job = stub.CreateJob(request, timeout=30)
    events = watch_all(stub, job.job_id)
    final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
    previews = [e.preview for e in events if e.WhichOneof("kind") == "preview"]
    assert previews and previews[0].image.data.startswith(b"\x89PNG")
    bundle = read_bundle(download(stub, final.final_artifact_id, tmp_path / "bundle"))
    assert bundle.manifest.family == "sdxl"
    assert sorted(bundle.embeddings()) == ["clip_g", "clip_l"]


def test_reconnecting_after_a_sequence_gives_exactly_the_missed_events(stub) -> None:
    job = stub.CreateJob(job_request(), timeout=30)
    stream = stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300)
    first = [next(stream) for _ in range(5)]
    stream.cancel()
    rest = watch_all(stub, job.job_id, after=first[-1].sequence)
    full = watch_all(stub, job.job_id)
    assert [e.sequence for e in first + rest] == [e.sequence for e in full]
    assert first + rest == full


@pytest.mark.slow
def test_duplicate_request_id_returns_the_same_job(stub) -> None:
    first = stub.CreateJob(job_request("dup-1"), timeout=30)
    again = stub.CreateJob(job_request("dup-1"), timeout=30)
    assert first.job_id == again.job_id
    watch_all(stub, first.job_id)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("instance_images"), "instance_images"),
        (
            lambda r: r.instance_images[1].__setattr__("data", b"not an image"),
            "instance_images[1].data",
        ),
        (lambda r: r.placeholder_tokens.__setitem__(0, "no brackets"), "placeholder_tokens[0]"),
        (lambda r: r.config.__setattr__("lora_rank", 0), "config.lora_rank"),
        (
            lambda r: r.config.__setattr__("learning_rate_unet", float("nan")),
            "config.learning_rate_unet",
        ),
        (lambda r: r.initializer_tokens.append("extra"), "initializer_tokens"),
        (lambda r: r.config.__setattr__("caption_dropout", 1.0), "config.caption_dropout"),
        (lambda r: r.config.evaluation_scales.append(9.0), "config.evaluation_scales"),
        (  # the best checkpoint is chosen by evaluation, which needs scales
            lambda r: r.config.__setattr__("select_final", trainer_pb2.FINAL_SELECTION_BEST),
            "config.select_final",
        ),
    ],
)
def test_bad_requests_get_invalid_argument_with_the_field_and_queue_nothing(stub, mutate, field):
    before = len(stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500)).jobs)
    request = job_request(f"bad-{field}")
    mutate(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    assert field in {v.field for v in bad.field_violations}
    assert len(stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500)).jobs) == before


def test_a_job_on_a_family_loraforge_does_not_train_is_refused(stub, tmp_path) -> None:
    request = job_request("sd3-job")
    request.base_model = str(write_model_index(tmp_path / "sd3"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is Stable Diffusion 3 (StableDiffusion3Pipeline)" in caught.value.details()
    assert "supported families: Stable Diffusion 1.x/2.x" in caught.value.details()
    listed = stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=500)).jobs
    assert all(job.request_id != "sd3-job" for job in listed)


def test_unknown_job_is_not_found(stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_cancel_stops_a_running_job_and_keeps_its_checkpoints(stub) -> None:
    job = stub.CreateJob(job_request(max_train_steps_tuning=5000, save_steps=3), timeout=30)
    for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300):
        if event.WhichOneof("kind") == "checkpoint":
            break
    cancelled = stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=60)
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    assert cancelled.checkpoint_artifact_ids
    assert cancelled.progress.global_step < 5000


def test_list_jobs_pages_and_filters(stub) -> None:
    # Its own jobs (the server is the module's: other tests' jobs may or may not be there),
    # cancelled at once so that they take no training time from the tests after it.
    created = [stub.CreateJob(job_request(seed=100 + i), timeout=30).job_id for i in range(3)]
    for job_id in created:
        stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job_id), timeout=60)
    seen, token = [], ""
    while True:
        page = stub.ListJobs(trainer_pb2.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) >= 3 and set(created) <= set(seen)
    done = stub.ListJobs(trainer_pb2.ListJobsRequest(state=trainer_pb2.JOB_STATE_SUCCEEDED))
    assert all(j.state == trainer_pb2.JOB_STATE_SUCCEEDED for j in done.jobs)
    cancelled = stub.ListJobs(trainer_pb2.ListJobsRequest(state=trainer_pb2.JOB_STATE_CANCELLED))
    assert all(j.state == trainer_pb2.JOB_STATE_CANCELLED for j in cancelled.jobs)
    assert set(created) <= {j.job_id for j in cancelled.jobs}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "method"),
    [("tiny_model", "pti"), ("tiny_flux", "pti"), ("tiny_zimage", "dreambooth_lora")],
)
def test_killed_server_resumes_the_job_after_restart(
    base: str, method: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = str(request.getfixturevalue(base))
    server = ServerProcess("trainer", data_dir=tmp_path, model=model)
    created = job_request(max_train_steps_ti=6, max_train_steps_tuning=60, save_steps=5)
    steps = 66  # inversion, then LoRA
    if method == "dreambooth_lora":
        created.method = trainer_pb2.TRAINING_METHOD_DREAMBOOTH_LORA
        del created.placeholder_tokens[:], created.initializer_tokens[:]
        steps = 60
    with server:
        with grpc.insecure_channel(server.target) as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            job = stub.CreateJob(created, timeout=30)
            last = 0
            for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id)):
                last = event.sequence
                if event.WhichOneof("kind") == "checkpoint" and event.checkpoint.global_step >= 10:
                    break
        server.kill()
    with (
        ServerProcess("trainer", data_dir=tmp_path, model=model, port=server.port) as again,
        grpc.insecure_channel(again.target) as channel,
    ):
        stub = trainer_pb2_grpc.TrainerStub(channel)
        rest = watch_all(stub, job.job_id, after=last)
        assert rest[0].sequence == last + 1
        assert [e.sequence for e in rest] == list(range(last + 1, last + 1 + len(rest)))
        final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
        assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
        logs = [e.log.message for e in rest if e.WhichOneof("kind") == "log"]
        assert any("resumed from checkpoint at step" in m for m in logs), logs
        assert final.final_artifact_id
        progress = [e.progress.global_step for e in rest if e.WhichOneof("kind") == "progress"]
        assert min(progress) > 10 and max(progress) == steps  # went on, not from the start


@pytest.mark.slow
def test_the_service_trains_a_job_on_two_processes(tiny_model: Path, tmp_path: Path) -> None:
    from tests.test_training_engine import assert_two_ranks

    with (
        ServerProcess(
            "trainer", data_dir=tmp_path, model=str(tiny_model),
            extra_args=["--num-processes", "2", "--device", "cpu"],
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):  # fmt: skip
        stub = trainer_pb2_grpc.TrainerStub(channel)
        job = stub.CreateJob(job_request(max_train_steps_ti=2, max_train_steps_tuning=2))
        events = watch_all(stub, job.job_id)
        final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id))
    assert final.state == trainer_pb2.JOB_STATE_SUCCEEDED, final.failure_reason
    assert_two_ranks([e.log.message for e in events if e.WhichOneof("kind") == "log"])
    manifest = read_bundle(tmp_path / "artifacts" / final.final_artifact_id).manifest
    assert manifest.training_config["num_processes"] == 2


@pytest.mark.slow
def test_a_replica_trains_max_jobs_at_once_and_queues_the_rest(
    tiny_model: Path, tmp_path: Path
) -> None:
    with (
        ServerProcess(
            "trainer", data_dir=tmp_path, model=str(tiny_model), extra_args=["--max-jobs", "2"]
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = trainer_pb2_grpc.TrainerStub(channel)
        ids = [
            stub.CreateJob(job_request(f"slot-{i}", max_train_steps_ti=2, max_train_steps_tuning=2),
                           timeout=30).job_id
            for i in range(3)
        ]  # fmt: skip
        for job_id in ids:
            watch_all(stub, job_id)
        jobs = [stub.GetJob(trainer_pb2.GetJobRequest(job_id=i)) for i in ids]
    assert all(j.state == trainer_pb2.JOB_STATE_SUCCEEDED for j in jobs), jobs
    started = [j.started_at.ToDatetime() for j in jobs]
    finished = [j.finished_at.ToDatetime() for j in jobs]
    assert started[1] < finished[0] and started[0] < finished[1]  # the first two overlapped
    assert started[2] >= min(finished[:2])  # the third waited for a free slot


def zygotes_of(server: ServerProcess) -> list[psutil.Process]:
    assert server.process is not None
    children = psutil.Process(server.process.pid).children()
    return [p for p in children if p.cmdline()[:1] == [ZYGOTE]]  # a zombie's is empty


def first_zygote(server: ServerProcess) -> list[psutil.Process]:
    """The zygote the server forked as it started (it names itself at once)."""
    deadline = time.monotonic() + 60
    while not zygotes_of(server):
        assert time.monotonic() < deadline, "no zygote before the first job"
    return zygotes_of(server)


@pytest.mark.slow
def test_training_processes_fork_from_one_zygote_and_outlive_its_death(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Each job's training process is forked from the server's one preloaded zygote (so jobs
    skip the training stack's imports), named in ps as an exec'd one would be. A zygote that
    dies stops its children as a dying server does: their jobs go back to the queue, a new
    zygote starts, and they resume and succeed. The server is exec'd here, as in production
    (elsewhere the tests fork servers from their forkserver): its first zygote, forked at its
    start, imports the training stack itself, and the one after it is exec'd."""
    exec_d = {forkserver.ENV: ""}
    with (
        ServerProcess("trainer", data_dir=tmp_path, model=str(tiny_model), env=exec_d) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert isinstance(server.process, subprocess.Popen)
        (zygote,) = first_zygote(server)
        zygotes = functools.partial(zygotes_of, server)
        stub = trainer_pb2_grpc.TrainerStub(channel)
        request = job_request("z-1", max_train_steps_ti=2, max_train_steps_tuning=2)
        watch_all(stub, stub.CreateJob(request, timeout=30).job_id)
        assert zygotes() == [zygote]  # the first job forked from it
        request = job_request("z-2", max_train_steps_ti=4, max_train_steps_tuning=40,
                              save_steps=8)  # fmt: skip
        job_id = stub.CreateJob(request, timeout=30).job_id
        for event in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id), timeout=300):
            if event.WhichOneof("kind") == "checkpoint":
                break
        (training,) = zygote.children()
        assert f"-m trainer_service.training.run --job-dir {tmp_path}" in " ".join(
            training.cmdline()
        ) and job_id in " ".join(training.cmdline())
        zygote.kill()
        events = watch_all(stub, job_id)
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=30)
        (new_zygote,) = zygotes()
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert new_zygote.pid != zygote.pid
    messages = [e.log.message for e in events if e.WhichOneof("kind") == "log"]
    assert any(m.startswith("resumed from checkpoint at step ") for m in messages), messages


def test_a_zygote_dead_before_the_first_job_is_replaced(tiny_model: Path, tmp_path: Path) -> None:
    """The zygote forked at the server's start dies before any job: the first job execs a new
    one and succeeds."""
    with (
        ServerProcess("trainer", data_dir=tmp_path, model=str(tiny_model)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        (first,) = first_zygote(server)
        first.kill()
        stub = trainer_pb2_grpc.TrainerStub(channel)
        request = job_request("z-1", max_train_steps_ti=2, max_train_steps_tuning=2)
        watch_all(stub, stub.CreateJob(request, timeout=30).job_id)
        job = stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=30).jobs[0]
        (zygote,) = zygotes_of(server)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.failure_reason
    assert zygote.pid != first.pid
