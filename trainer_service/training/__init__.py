"""The training engine: LoRA-PTI and DreamBooth-LoRA on accelerate + peft, a library that runs
without gRPC or the job store: ``trainer_service.training.trainer.train(config, data,
output_dir, on_event)``. The trainer service wraps it (run.py, one child process per job)."""

# The resume states the engine writes in a job's checkpoints/ folder (checkpoint.py), named
# here, torch-free, for the service that moves them to and from the artifact store (jobdir.py).
RESUME_STATES = "step-*.pt"


def checkpoint_name(global_step: int) -> str:
    """The file name of the resume state at ``global_step``."""
    return f"step-{global_step:07d}.pt"
