"""Code shared by the loraforge trainer and generator services.

Artifact bundle format, base-model resolution (the tiny offline model, public architectures),
devices, and the gRPC server plumbing (health, reflection, logging, graceful shutdown).
"""
