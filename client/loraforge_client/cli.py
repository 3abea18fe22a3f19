"""``loraforge``: train, watch, generate and manage adapters from a terminal.

Server addresses come from ``--trainer`` / ``--generator`` or ``LORAFORGE_TRAINER`` /
``LORAFORGE_GENERATOR``; an auth token from ``--auth-token`` or ``LORAFORGE_AUTH_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loraforge.v1 import trainer_pb2

from loraforge_client._common import request_id
from loraforge_client.clients import GeneratorClient, TrainerClient
from loraforge_client.enums import SCHEDULERS, TEMPLATES, TRAINING_ENUMS
from loraforge_client.errors import InvalidArgumentError, LoraforgeError
from loraforge_client.types import AdapterRef, JobEvent

# Training options the subcommand defines itself.
_SKIP_OPTIONS = {"seed"}


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainingConfig field, typed from the contract."""
    group = parser.add_argument_group("training options (default: the server's)")
    for field in trainer_pb2.TrainingConfig.DESCRIPTOR.fields:
        if field.name in _SKIP_OPTIONS:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name in TRAINING_ENUMS:
            group.add_argument(flag, choices=sorted(TRAINING_ENUMS[field.name]))
        elif field.type == field.TYPE_BOOL:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif field.type == field.TYPE_STRING and field.is_repeated:
            group.add_argument(flag, nargs="+", metavar="TEXT")
        elif field.type == field.TYPE_FLOAT and field.is_repeated:
            group.add_argument(flag, nargs="+", type=float, metavar="X")
        elif field.type == field.TYPE_STRING:
            group.add_argument(flag)
        elif field.type == field.TYPE_FLOAT:
            group.add_argument(flag, type=float)
        else:
            group.add_argument(flag, type=int)


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        f.name for f in trainer_pb2.TrainingConfig.DESCRIPTOR.fields if f.name not in _SKIP_OPTIONS
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _bar(fraction: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressPrinter:
    """A one-line progress bar on stderr (redrawn in a terminal, one line per 5% otherwise)."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_report = -1.0
        self.open_line = False

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _newline(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def event(self, event: JobEvent) -> None:
        if event.kind == "progress" and event.progress is not None:
            p = event.progress
            fraction = p.step / p.total_steps if p.total_steps else 0.0
            if not self.tty and fraction - self.last_report < 0.05 and p.step != p.total_steps:
                return
            self.last_report = fraction
            self._line(
                f"{p.phase:9s} {_bar(fraction)} {p.step}/{p.total_steps} "
                f"loss {p.loss:.4f} {p.steps_per_second:.2f} it/s ETA {_duration(p.eta_seconds)}"
            )
            return
        self._newline()
        self.last_report = -1.0
        if event.kind == "state":
            reason = f" ({event.reason})" if event.reason else ""
            self.stream.write(f"job {event.job_id}: {event.state}{reason}\n")
        elif event.kind == "checkpoint":
            self.stream.write(f"checkpoint at step {event.global_step}: {event.artifact_id}\n")
        elif event.kind == "final_artifact":
            self.stream.write(f"final artifact: {event.artifact_id}\n")
        elif event.kind == "evaluation" and event.evaluation is not None:
            best = " (best so far)" if event.best else ""
            self.stream.write(f"{event.evaluation.table()}\n  checkpoint {event.artifact_id}"
                              f"{best}\n")  # fmt: skip
        elif event.kind == "preview":
            self.stream.write(
                f"preview at step {event.global_step} ({len(event.preview_png)} bytes PNG)\n"
            )
        elif event.kind == "log":
            self.stream.write(f"[{event.level}] {event.message}\n")
        self.stream.flush()

    def close(self) -> None:
        self._newline()


def _trainer(args: argparse.Namespace) -> TrainerClient:
    return TrainerClient(args.trainer, token=args.auth_token, timeout=args.timeout)


def _generator(args: argparse.Namespace) -> GeneratorClient:
    return GeneratorClient(args.generator, token=args.auth_token, timeout=args.timeout)


def _watch(client: TrainerClient, job_id: str, after: int = 0) -> int:
    printer = ProgressPrinter()
    try:
        for event in client.watch(job_id, after_sequence=after):
            printer.event(event)
    except KeyboardInterrupt:
        printer.close()
        print(
            f"stopped watching; the job keeps running (loraforge watch {job_id})", file=sys.stderr
        )
        return 130
    printer.close()
    job = client.get_job(job_id)
    if job.state != "succeeded":
        print(f"job {job_id} {job.state}: {job.failure_reason}", file=sys.stderr)
        return 1
    print(job.final_artifact_id)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    with _trainer(args) as client:
        job = client.create_job_from_folder(
            args.folder, placeholder_tokens=args.token, initializer_tokens=args.init or [],
            template=args.template, method=args.method, base_model=args.base_model,
            request_id=args.request_id, seed=args.seed, **_training_options(args),
        )  # fmt: skip
        print(job.job_id)
        sys.stdout.flush()
        return _watch(client, job.job_id) if args.watch else 0


def cmd_watch(args: argparse.Namespace) -> int:
    with _trainer(args) as client:
        return _watch(client, args.job_id, args.after)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _trainer(args) as client:
        print(f"{'JOB':22s} {'STATE':10s} {'STEP':>11s} {'TOKENS':12s} ARTIFACT")
        for job in client.list_jobs(state=args.state):
            step = f"{job.progress.global_step}" if job.progress else "-"
            print(
                f"{job.job_id:22s} {job.state:10s} {step:>11s} "
                f"{','.join(job.placeholder_tokens):12s} {job.final_artifact_id}"
            )
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _trainer(args) as client:
        job = client.cancel_job(args.job_id)
        print(f"{job.job_id}: {job.state}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _trainer(args) as client:
        print(client.download_artifact(args.artifact_id, args.output))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    adapters = [AdapterRef.parse(a) for a in args.adapter or []]
    with _generator(args) as client:
        images = client.generate(
            args.prompt, adapters=adapters, negative_prompt=args.negative_prompt,
            width=args.width, height=args.height, steps=args.steps,
            guidance_scale=args.guidance_scale, scheduler=args.scheduler, seed=args.seed,
            num_images=args.num_images, output_format=args.format, init_image=args.init_image,
            mask_image=args.mask_image, strength=args.strength,
            max_sequence_length=args.max_sequence_length,
        )  # fmt: skip
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, image in enumerate(images):
        path = image.save(Path(args.output) / f"{stamp}-{i}-seed{image.seed}.{image.format}")
        print(f"{path}  seed={image.seed}")
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    with _generator(args) as client:
        if args.action == "load":
            info = client.load_adapter(
                args.adapter_id, args.source, pin=args.pin, in_store=args.in_store
            )
            print(
                f"{info.adapter_id}: rank {info.rank}, tokens {info.tokens}, "
                f"{info.size_bytes} bytes, sha256 {info.sha256[:12]}, from {info.source}"
            )
        elif args.action == "unload":
            client.unload_adapter(args.adapter_id)
            print(f"{args.adapter_id}: unloaded")
        else:
            print(
                f"{'ADAPTER':24s} {'RESIDENT':8s} {'PINNED':6s} {'RANK':>4s} {'FAMILY':6s} "
                f"{'FORMAT':11s} {'SCALE':>5s} {'TOKENS':16s} SOURCE"
            )
            for a in client.list_adapters():
                # the recommended scale, where its training measured one
                scale = f"{a.evaluation.recommended_scale:5.2f}" if a.evaluation else "    -"
                print(
                    f"{a.adapter_id:24s} {a.resident!s:8s} {a.pinned!s:6s} {a.rank:4d} "
                    f"{a.family:6s} {a.source_format:11s} {scale} {' '.join(a.tokens):16s} "
                    f"{a.source}"
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trainer",
        default=os.environ.get("LORAFORGE_TRAINER", "localhost:50051"),
        help="trainer address (env LORAFORGE_TRAINER)",
    )
    parser.add_argument(
        "--generator",
        default=os.environ.get("LORAFORGE_GENERATOR", "localhost:50052"),
        help="generator address (env LORAFORGE_GENERATOR)",
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("LORAFORGE_AUTH_TOKEN"),
        help="bearer token (env LORAFORGE_AUTH_TOKEN)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument(
        "--request-id",
        help="the calls' request id (x-request-id) in the servers' logs; default: one per call, "
        "shown with an error",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="upload a folder of images and start training")
    train.add_argument(
        "folder", help="instance images; NAME.txt captions and NAME.mask.png masks beside them"
    )
    train.add_argument(
        "--token",
        action="append",
        required=True,
        help="placeholder token to learn, e.g. '<mydog>' (repeatable)",
    )
    train.add_argument(
        "--init", action="append", help="initializer per token (word, <rand-0.017> or <zero>)"
    )
    train.add_argument("--template", choices=sorted(TEMPLATES), default="object")
    train.add_argument("--method", choices=["pti", "dreambooth_lora"], default="pti")
    train.add_argument("--base-model", default="", help="hub id or server-side folder")
    train.add_argument("--request-id", help="idempotency key (default: random)")
    train.add_argument("--seed", type=int)
    train.add_argument("--watch", action="store_true", help="show live progress until done")
    _add_training_options(train)
    train.set_defaults(func=cmd_train)

    watch = commands.add_parser("watch", help="follow a job's progress")
    watch.add_argument("job_id")
    watch.add_argument("--after", type=int, default=0, help="skip events up to this sequence")
    watch.set_defaults(func=cmd_watch)

    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jobs.set_defaults(func=cmd_jobs)

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=cmd_cancel)

    download = commands.add_parser("download", help="download an artifact bundle")
    download.add_argument("artifact_id")
    download.add_argument("-o", "--output", required=True, help="folder to extract into")
    download.set_defaults(func=cmd_download)

    generate = commands.add_parser("generate", help="render images, optionally with adapters")
    generate.add_argument("prompt")
    generate.add_argument(
        "--adapter",
        "--lora",
        action="append",
        help="ID_OR_REFERENCE[:SCALE[:TEXT_ENCODER_SCALE]] (repeatable); a reference is "
        "hf://OWNER/REPO[@REV]/FILE.safetensors, https://... or s3://BUCKET/KEY, which the "
        "server fetches if its policy allows (docs/adapters.md)",
    )
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument("--width", type=int, default=0)
    generate.add_argument("--height", type=int, default=0)
    generate.add_argument("--steps", type=int, default=0, help="0: the server's default")
    generate.add_argument("--guidance-scale", type=float,
                          help="unset: the model family's (SD: 7.5; FLUX.1: 3.5)")  # fmt: skip
    generate.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="default")
    generate.add_argument(
        "--max-sequence-length", type=int, default=0,
        help="FLUX.1: T5 tokens per prompt, up to 512 (0: the model's)",
    )  # fmt: skip
    generate.add_argument("--seed", type=int)
    generate.add_argument("-n", "--num-images", type=int, default=1)
    generate.add_argument("--format", choices=["png", "jpeg", "webp"], default="png")
    generate.add_argument("--init-image", help="img2img: start from this image (a file)")
    generate.add_argument("--mask-image", help="inpainting, with --init-image: white = repaint")
    generate.add_argument(
        "--strength", type=float, help="0 (the init image) to 1; default 0.8, inpainting 1.0"
    )
    generate.add_argument("-o", "--output", default=".", help="folder for the images")
    generate.set_defaults(func=cmd_generate)

    adapters = commands.add_parser("adapters", help="list, load or unload adapters")
    actions = adapters.add_subparsers(dest="action")
    actions.add_parser("ls", help="list adapters")
    load = actions.add_parser("load", help="load an adapter")
    load.add_argument("adapter_id")
    load.add_argument(
        "source",
        help="bundle folder, .safetensors or .tar file, or a reference (hf://, "
        "https://, s3://) the server fetches",
    )
    load.add_argument("--pin", action="store_true", help="never evict it")
    load.add_argument(
        "--in-store", action="store_true", help="source is a path in the server's artifact store"
    )
    unload = actions.add_parser("unload", help="unload an adapter")
    unload.add_argument("adapter_id")
    adapters.set_defaults(func=cmd_adapters, action="ls")
    return parser


def _request_note(err: LoraforgeError) -> str:
    return f" (request id {err.request_id})" if err.request_id else ""


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with request_id(args.request_id) if args.request_id else nullcontext():
            code = args.func(args)
    except InvalidArgumentError as err:
        print(f"error: {err.message}{_request_note(err)}", file=sys.stderr)
        for violation in getattr(err, "field_violations", []):
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        code = 1
    except LoraforgeError as err:
        name = err.code.name if err.code else "error"
        print(f"error: {err.message} [{name}]{_request_note(err)}", file=sys.stderr)
        code = 1
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
