"""Thin Python client for the loraforge Trainer and Generator services (grpcio + protobuf only)."""

__version__ = "0.1.0"
