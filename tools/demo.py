"""The main job (``make demo``): train a PTI LoRA and render it at several scales, end to end.

Offline on CPU with the embedded tiny model (or ``--model`` on a GPU machine):

1. starts the trainer and the generator as real server processes on loopback ports;
2. trains a pivotal-tuning LoRA (token ``<s1>``) on toy-world images of a colour the base
   model never saw (the recipe in ``loraforge_core.toyworld.fidelity``), streaming the progress bar
   through the thin client;
3. loads the resulting bundle into the generator and renders one prompt and seed at UNet
   scales 0, 0.5 and 1.0, with the text encoder at the same scale and at half of it;
4. scores subject and prompt fidelity over the probe prompts at each scale
   (``fidelity.score``), with the images drawn by the generator service;
5. writes one labelled grid PNG, prints where it is, and stops both services with SIGTERM.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraforge_client import GeneratorClient, TrainerClient
from loraforge_client.cli import ProgressPrinter
from PIL import Image, ImageDraw, ImageFont

from loraforge_core import toyworld
from loraforge_core.launch import ServerProcess
from loraforge_core.toyworld.fidelity import (
    CONCEPT_COLOR,
    CONCEPT_TRAINING,
    GUIDANCE,
    Concept,
    concept_examples,
    format_table,
    score,
)

GRID_SCALES = (0.0, 0.5, 1.0)
TILE = 128


def make_instance_images(folder: Path) -> Path:
    """Purple (a colour the base model was never shown) on the shapes it knows, captioned
    "a <s1> circle": the token must learn the colour, the rest of the prompt keeps the shape."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image, caption in concept_examples():
        image.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def fidelity_table(client: GeneratorClient, adapter: str, seeds: int, steps: int) -> str:
    """Fidelity per scale (UNet and text encoder together) over the probe prompts, with the
    images drawn by the generator service."""

    def one(prompt: str, scale: float, seed: int) -> Image.Image:
        image = client.generate(prompt, adapters=[(adapter, scale)], seed=seed, steps=steps,
                                guidance_scale=GUIDANCE)[0]  # fmt: skip
        return Image.open(io.BytesIO(image.data))

    def render(prompts: list[str], scale: float, seeds: list[int]) -> list[Image.Image]:
        # Requests in flight together: the generator draws them in shared batches.
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(one, prompts, [scale] * len(prompts), seeds))

    return format_table(score(render, Concept(CONCEPT_COLOR), "<s1>", seeds=seeds))


LABEL_FONT_SIZE = 14


def grid(rows: list[tuple[str, list[bytes]]], columns: list[str]) -> Image.Image:
    # Pillow's default font at its default 10 px draws a space 2 px wide: labels read as one
    # word. At 14 px words stay apart.
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    label_width, header = 190, 28
    canvas = Image.new(
        "RGB", (label_width + TILE * len(columns), header + TILE * len(rows)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        draw.text((label_width + c * TILE + 6, 6), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = header + r * TILE
        draw.text((6, y + TILE // 2 - LABEL_FONT_SIZE // 2), label, fill="black", font=font)
        for c, data in enumerate(images):
            tile = (
                Image.open(io.BytesIO(data))
                .convert("RGB")
                .resize((TILE, TILE), Image.Resampling.NEAREST)
            )
            canvas.paste(tile, (label_width + c * TILE, y))
    return canvas


def run(args: argparse.Namespace, data_dir: Path) -> Path:
    images = make_instance_images(data_dir / "instance-images")
    trainer = ServerProcess("trainer", data_dir=data_dir / "trainer", model=args.model)
    generator = ServerProcess("generator", data_dir=data_dir / "generator", model=args.model)
    with trainer, generator:
        print(f"trainer on {trainer.target}, generator on {generator.target}")
        with TrainerClient(trainer.target) as client:
            options = dict(CONCEPT_TRAINING)
            options["template"] = options.pop("use_template")
            job = client.create_job_from_folder(images, **options)
            print(f"training job {job.job_id}")
            printer = ProgressPrinter(sys.stdout)
            for event in client.watch(job.job_id):
                printer.event(event)
            printer.close()
            job = client.wait(job.job_id)
            bundle = client.download_artifact(job.final_artifact_id, data_dir / "bundle")
        with GeneratorClient(generator.target, timeout=300) as client:
            info = client.load_adapter("purple", bundle)
            print(f"loaded adapter 'purple' (rank {info.rank}, tokens {info.tokens})")
            rows = []
            for te_label, te_factor in (("text enc = scale", 1.0), ("text enc = scale/2", 0.5)):
                row = []
                for scale in GRID_SCALES:
                    image = client.generate(
                        args.prompt, adapters=[("purple", scale, scale * te_factor)],
                        seed=args.seed, steps=args.inference_steps, guidance_scale=GUIDANCE,
                    )[0]  # fmt: skip
                    row.append(image.data)
                    reading = toyworld.check(Image.open(io.BytesIO(image.data)))
                    print(
                        f"  unet scale {scale:g}, {te_label}: the checker sees "
                        f"{reading.color or 'no colour'} {reading.shape or 'no shape'}"
                    )
                rows.append((te_label, row))
            if args.fidelity_seeds:
                print(fidelity_table(client, "purple", args.fidelity_seeds, args.inference_steps))
        columns = [f"unet scale {s:g}" for s in GRID_SCALES]
        picture = grid(rows, columns)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "lora_scales_grid.png"
        picture.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--model", default="", help="base model (default: the tiny model)")
    parser.add_argument("--prompt", default="a <s1> square")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--fidelity-seeds", type=int, default=4, help="seeds per probe prompt (0: skip)"
    )
    parser.add_argument("--inference-steps", type=int, default=20)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loraforge-demo-") as tmp:
        path = run(args, Path(tmp))
    print(f"grid of scales written to {path.resolve()}")
    print(f"demo finished in {time.monotonic() - started:.0f}s; both services stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
