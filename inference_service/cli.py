"""``loraforge-generator``: run the Generator server."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from loraforge_core.settings import ServerSettings, add_setting, server_parser

if TYPE_CHECKING:
    from inference_service.fetching import FetchPolicy

DEFAULT_PORT = 50052


def build_parser() -> argparse.ArgumentParser:
    parser, _, serve = server_parser("loraforge-generator", __doc__, "Generator", DEFAULT_PORT)
    add_setting(
        serve,
        "--max-resident-adapters",
        default=8,
        type=int,
        help="adapters kept loaded; the least recently used is evicted",
    )
    add_setting(
        serve,
        "--queue-size",
        default=16,
        type=int,
        help="requests allowed to wait; more get RESOURCE_EXHAUSTED",
    )
    add_setting(
        serve,
        "--adapter-slot-rank",
        default=16,
        type=int,
        help="rank of the pre-shaped adapter slots (loading one up to it is a weight copy); "
        "0: no slots, every adapter takes diffusers' general path",
    )
    add_setting(
        serve,
        "--adapter-slot-targets",
        default="default",
        choices=["default", "extended"],
        help="layers the slots cover: default (attention and GEGLU, CLIP attention) or "
        "extended (also extended LoRA's: the UNet's ResNet convolutions and linears, the "
        "transformers' projections in and out, the down/upsamplers; LoCon adapters then load "
        "by copy too; the slots' unused factors cost memory, and compute only under "
        "--compile-denoiser in mixed batches)",
    )
    add_setting(
        serve,
        "--max-batch-images",
        default=8,
        type=int,
        help="images that waiting requests with different adapters may share in one denoising "
        "batch (same size, steps, guidance and scheduler); 1 turns batching off",
    )
    add_setting(
        serve,
        "--artifact-cache-gb",
        default=20.0,
        type=float,
        help="with an s3:// --artifact-store: local disk for fetched bundles; the least "
        "recently used go first, loaded adapters never",
    )
    add_setting(
        serve,
        "--adapter-fusion",
        default="on",
        choices=["on", "off"],
        help="on: a batch whose requests share one adapter set runs on weights with the set "
        "merged in (no LoRA cost per step; costs one copy of the LoRA-targeted UNet weights, "
        "367 MiB for SD 1.5 in fp16); off: always the batched LoRA path",
    )
    add_setting(
        serve,
        "--compile-denoiser",
        default="off",
        choices=["on", "off"],
        help="torch.compile the denoiser (the UNet or FLUX's transformer; inductor) at start; "
        "changing adapters or scales does not recompile, new image sizes and batch sizes do",
    )
    serve.add_argument("--compile-unet", dest="compile_denoiser", choices=["on", "off"],
                       help="the former name of --compile-denoiser")  # fmt: skip
    add_setting(
        serve,
        "--adapter-sources",
        default="",
        help="comma-separated reference schemes requests may name adapters by, besides ids "
        "and the artifact store: hf (the model hub at HF_ENDPOINT, token HF_TOKEN), https, "
        "s3 (the artifact store's endpoint and keys); off by default (docs/adapters.md)",
    )
    add_setting(
        serve,
        "--adapter-allow-hosts",
        default="",
        help="comma-separated hosts https references may fetch from; empty: any host whose "
        "address is public",
    )
    add_setting(
        serve,
        "--adapter-allow-buckets",
        default="",
        help="comma-separated S3 buckets s3 references may read, besides the artifact store's",
    )
    add_setting(
        serve,
        "--adapter-allow-networks",
        default="",
        help="comma-separated CIDRs (e.g. 10.0.0.0/8) that references may fetch from although "
        "they are loopback, link-local or private; empty: public addresses only",
    )
    add_setting(
        serve,
        "--adapter-max-mb",
        default=2048.0,
        type=float,
        help="the largest adapter file a reference may fetch, in MiB",
    )
    add_setting(
        serve,
        "--adapter-fetch-timeout",
        default=300.0,
        type=float,
        help="seconds an https reference's whole download may take (S3 and the hub use "
        "their clients' own timeouts and retries)",
    )
    add_setting(
        serve,
        "--adapter-ca-file",
        default="",
        help="a PEM bundle of the CAs https references are checked against (default: the "
        "system's); bearer tokens per host come from LORAFORGE_ADAPTER_TOKENS=host=token,...",
    )
    add_setting(
        serve,
        "--preload",
        default="",
        help="comma-separated adapter ids (in the artifact store) to load and pin",
    )
    return parser


def fetch_policy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FetchPolicy:
    """The --adapter-* settings as the policy references are fetched under."""
    import ipaddress
    import os

    from inference_service.fetching import FetchPolicy
    from inference_service.references import SCHEMES

    def items(text: str) -> list[str]:
        return [item.strip().lower() for item in text.split(",") if item.strip()]

    sources = items(args.adapter_sources)
    if unknown := set(sources) - set(SCHEMES):
        parser.error(f"--adapter-sources: {sorted(unknown)} unknown; choose from {SCHEMES}")
    try:
        networks = tuple(
            ipaddress.ip_network(n, strict=False) for n in items(args.adapter_allow_networks)
        )
    except ValueError as err:
        parser.error(f"--adapter-allow-networks: {err}")
    return FetchPolicy(
        sources=frozenset(sources), hosts=frozenset(items(args.adapter_allow_hosts)),
        buckets=frozenset(items(args.adapter_allow_buckets)), networks=networks,
        max_bytes=int(args.adapter_max_mb * 2**20), timeout_s=args.adapter_fetch_timeout,
        ca_file=args.adapter_ca_file,
        tokens=FetchPolicy.parse_tokens(os.environ.get("LORAFORGE_ADAPTER_TOKENS", "")),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    from loraforge_core.logs import configure_logging

    settings = ServerSettings.from_cli(args, parser)
    configure_logging(settings.log_level)  # before the libraries it quiets are imported
    from inference_service.server import GeneratorServicer
    from inference_service.service import GeneratorService
    from loraforge_core.grpc_edge import serve

    service = GeneratorService(
        settings,
        max_resident_adapters=args.max_resident_adapters,
        queue_size=args.queue_size,
        max_batch_images=args.max_batch_images,
        slot_rank=args.adapter_slot_rank,
        extended_slots=args.adapter_slot_targets == "extended",
        preload=tuple(a for a in args.preload.split(",") if a),
        cache_bytes=int(args.artifact_cache_gb * 2**30),
        fuse_adapters=args.adapter_fusion == "on",
        compile_denoiser=args.compile_denoiser == "on",
        fetch_policy=fetch_policy(args, parser),
    )
    sys.exit(asyncio.run(serve(service, GeneratorServicer(service), settings)))
