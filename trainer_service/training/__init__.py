"""The training engine: LoRA-PTI and DreamBooth-LoRA on accelerate + peft, a library that runs
without gRPC or the job store: ``trainer_service.training.trainer.train(config, data,
output_dir, on_event)``. The trainer service wraps it (run.py, one child process per job)."""
