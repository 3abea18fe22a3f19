"""``loraforge-trainer export`` and ``import``: bundles to and from other tools' formats."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from loraforge_core import interop
from loraforge_core.bundle import LORA_FILE, Bundle, read_bundle
from loraforge_core.files import atomic_write_bytes

# Forge skips a whole LoRA file with more keys than this that it cannot map (bundled tokens).
FORGE_UNMATCHED_KEY_LIMIT = 12


def run_export(args: argparse.Namespace) -> Iterator[str]:
    from safetensors.torch import save

    bundle = read_bundle(args.bundle)
    if args.format == "kohya":
        state, metadata = interop.export_kohya(
            bundle, bundle_embeddings=args.bundle_embeddings, name=args.name or args.output.stem
        )
        tokens = len(bundle.manifest.tokens)
        if args.bundle_embeddings and tokens > FORGE_UNMATCHED_KEY_LIMIT:
            print(
                f"warning: {tokens} bundled tokens: Forge skips a LoRA file with more than "
                f"{FORGE_UNMATCHED_KEY_LIMIT} keys it cannot map; for Forge, export without "
                "--bundle-embeddings (the tokens then go beside the file)",
                file=sys.stderr,
            )
        atomic_write_bytes(args.output, save(state, metadata=metadata))
        yield str(args.output)
        if bundle.manifest.tokens and not args.bundle_embeddings:
            folder = args.output.with_name(args.output.stem + "-embeddings")
            yield from _write_embeddings(bundle, folder)
    elif args.format == "diffusers":
        atomic_write_bytes(args.output, (bundle.path / LORA_FILE).read_bytes())
        yield str(args.output)
    else:
        yield from _write_embeddings(bundle, args.output)


def _write_embeddings(bundle: Bundle, folder: Path) -> Iterator[str]:
    """One embedding file per learned token in ``folder`` (A1111, ComfyUI, diffusers)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for stem, state in interop.export_embeddings(bundle).items():
        path = folder / f"{stem}.safetensors"
        save_file(state, path)
        yield str(path)


def run_import(args: argparse.Namespace) -> Iterator[str]:
    from loraforge_core.models import load_pipeline

    pipe = load_pipeline(args.model)
    for path in args.files:
        bundle = interop.import_file(
            path, pipe, args.output, base_model=args.model or "loraforge/tiny"
        )
        yield f"{bundle.path}  tokens={bundle.manifest.tokens} rank={bundle.manifest.rank}"
