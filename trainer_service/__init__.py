"""loraforge trainer: LoRA-PTI and DreamBooth-LoRA fine-tuning as a gRPC service."""
