"""``loraforge-trainer``: run the trainer server, or build the tiny offline model."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from loraforge_core.settings import (
    FleetSettings,
    ServerSettings,
    add_setting,
    in_range,
    server_parser,
)

DEFAULT_PORT = 50051


def build_parser() -> argparse.ArgumentParser:
    parser, commands, serve = server_parser("loraforge-trainer", __doc__, "Trainer", DEFAULT_PORT)
    add_setting(
        serve,
        "--num-processes",
        default=1,
        type=int,
        help="training processes per job (data parallel under torch.distributed.run; one per GPU)",
    )
    add_setting(
        serve,
        "--max-jobs",
        default=None,
        type=in_range(int, 0, 64, "--max-jobs"),
        help="jobs this replica trains at once, each on --num-processes GPUs of its own; "
        "0: answer RPCs only, other replicas train (default: every GPU busy, 1 on a CPU)",
    )
    add_setting(
        serve,
        "--keep-checkpoints",
        default=0,
        type=in_range(int, 0, 100_000, "--keep-checkpoints"),
        help="checkpoints kept per job: the last N (resume states and bundles) plus the "
        "best-scoring and the final bundle; older ones are deleted from the artifact store "
        "(default 0: keep every one)",
    )
    FleetSettings.add_arguments(serve)
    export = commands.add_parser("export", help="export a bundle for other tools")
    export.add_argument("bundle", type=Path, help="bundle folder")
    export.add_argument(
        "--format", required=True, choices=["kohya", "diffusers", "embeddings-a1111"]
    )
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="file (kohya, diffusers) or folder (embeddings-a1111)",
    )
    export.add_argument(
        "--name",
        default="",
        help="kohya: the LoRA's name in its metadata (ss_output_name); default: the file name",
    )
    export.add_argument(
        "--bundle-embeddings",
        action="store_true",
        help="kohya: put the learned tokens in the LoRA file as bundle_emb.* keys (A1111 reads "
        "them, undotted; stock diffusers then refuses the file; Forge skips it past 12 tokens). "
        "Default: beside it, in OUTPUT-embeddings/, one A1111/ComfyUI/diffusers file per token",
    )
    imp = commands.add_parser(
        "import",
        help="turn a kohya/A1111, diffusers/peft or "
        "cloneofsimo lora_diffusion .safetensors into a bundle",
    )
    imp.add_argument("files", type=Path, nargs="+")
    imp.add_argument(
        "--model", default="", help="base model the LoRA was made for (default: the tiny model)"
    )
    imp.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="artifact store folder; each bundle lands in OUTPUT/<bundle id>",
    )
    merge = commands.add_parser(
        "merge",
        help="merge bundles (lora_add): concat = exactly the adapters applied together, sum = "
        "weighted sum of the factors (same layers and ranks), base = into the base model",
    )
    merge.add_argument("bundles", type=Path, nargs="+", help="bundle folders")
    merge.add_argument("--mode", choices=["concat", "sum", "base"], default="concat")
    merge.add_argument(
        "--weights", type=float, nargs="+",
        help="one per bundle (default: 1 each for concat and base, 1/N each for sum)",
    )  # fmt: skip
    merge.add_argument(
        "-o", "--output", type=Path, required=True,
        help="artifact store folder (the bundle lands in OUTPUT/<bundle id>); for --mode base, "
        "the diffusers model folder to write",
    )  # fmt: skip
    merge.add_argument(
        "--model", default="", help="--mode base: the base model (default: the bundles')"
    )
    extract = commands.add_parser(
        "extract",
        help="extract a LoRA bundle from a fine-tuned model (lora_distill: SVD of tuned - base)",
    )
    extract.add_argument("--tuned", required=True, help="the fine-tuned model (hub id or folder)")
    extract.add_argument("--base", required=True, help="the model it was tuned from")
    extract.add_argument("--rank", type=int, default=4)
    extract.add_argument(
        "--clamp-quantile", type=float, default=0.99,
        help="clamp the factors to this quantile of their values (lora_distill's default 0.99)",
    )  # fmt: skip
    extract.add_argument(
        "-o", "--output", type=Path, required=True,
        help="artifact store folder; the bundle lands in OUTPUT/<bundle id>",
    )  # fmt: skip
    tiny = commands.add_parser(
        "tiny-model",
        help="write the tiny architecture with random (seeded) weights to a folder; the trained "
        "toy-world model ships in loraforge_core/assets/tiny-sd",
    )
    tiny.add_argument("output", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def _run_merging(args: argparse.Namespace):
    from trainer_service.merging import extract_lora, merge_bundles

    if args.command == "extract":
        bundle = extract_lora(args.tuned, args.base, args.rank, args.clamp_quantile, args.output)
        yield f"{bundle.path}  tokens={bundle.manifest.tokens} rank={bundle.manifest.rank}"
        return
    count = len(args.bundles)
    weights = args.weights or [1.0 / count if args.mode == "sum" else 1.0] * count
    output, renamed = merge_bundles(args.bundles, weights, args.mode, args.output, args.model)
    for old, new in renamed.items():
        yield f"token {old} renamed to {new}"
    yield str(output)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("export", "import"):
        from trainer_service.interop_cli import run_export, run_import

        try:
            for line in (run_export if args.command == "export" else run_import)(args):
                print(line)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        return
    if args.command in ("merge", "extract"):
        try:
            for line in _run_merging(args):
                print(line)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        return
    if args.command == "tiny-model":
        from loraforge_core.models import save_tiny_model

        print(save_tiny_model(args.output, seed=args.seed))
        return
    from loraforge_core.logs import configure_logging

    settings = ServerSettings.from_cli(args, parser)
    configure_logging(settings.log_level)  # before the libraries it quiets are imported
    if args.num_processes <= 1 and args.max_jobs != 0:  # single-process jobs fork from it
        from trainer_service.training import zygote

        zygote.fork_first()  # before any thread starts
    from loraforge_core.grpc_edge import serve
    from trainer_service.server import TrainerServicer
    from trainer_service.service import TrainerService

    fleet = FleetSettings.from_args(args)
    service = TrainerService(
        settings,
        num_processes=args.num_processes,
        max_jobs=args.max_jobs,
        fleet=fleet,
        keep_checkpoints=args.keep_checkpoints,
    )
    sys.exit(asyncio.run(serve(service, TrainerServicer(service), settings)))
