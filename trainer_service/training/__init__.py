"""The training engine: LoRA-PTI and DreamBooth-LoRA on accelerate + peft, usable without gRPC."""
