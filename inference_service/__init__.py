"""loraforge generator: text-to-image with hot-swapped, per-request scaled LoRA adapters."""
