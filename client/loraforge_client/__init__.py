"""Thin Python client for the loraforge Trainer and Generator services (grpcio + protobuf only).

from loraforge_client import TrainerClient, GeneratorClient

with TrainerClient("localhost:50051") as trainer:
    job = trainer.create_job_from_folder("photos/", placeholder_tokens=["<mydog>"])
    for event in trainer.watch(job.job_id):
        ...
    job = trainer.wait(job.job_id)

with GeneratorClient("localhost:50052") as generator:
    generator.load_adapter("mydog", "bundle-folder/")
    images = generator.generate("a <mydog> at the beach", adapters=[("mydog", 0.8)])
"""

from loraforge_client._common import TLS, ImageFile, images_from_folder, request_id
from loraforge_client.aio import AsyncGeneratorClient, AsyncTrainerClient
from loraforge_client.clients import GeneratorClient, TrainerClient
from loraforge_client.errors import (
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    JobFailedError,
    LoraforgeError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from loraforge_client.types import AdapterInfo, AdapterRef, GeneratedImage, Job, JobEvent

__version__ = "0.1.0"

__all__ = [
    "TLS",
    "AdapterInfo",
    "AdapterRef",
    "AsyncGeneratorClient",
    "AsyncTrainerClient",
    "FailedPreconditionError",
    "GeneratedImage",
    "GeneratorClient",
    "ImageFile",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobEvent",
    "JobFailedError",
    "LoraforgeError",
    "NotFoundError",
    "ResourceExhaustedError",
    "TrainerClient",
    "UnauthenticatedError",
    "UnavailableError",
    "images_from_folder",
    "request_id",
]
