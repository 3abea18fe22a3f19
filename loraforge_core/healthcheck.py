"""``python -m loraforge_core.healthcheck [--port P]``: exit 0 when the local server is SERVING.

For container HEALTHCHECKs (Kubernetes uses its native gRPC probes instead). Without
``--port`` it checks ``LORAFORGE_PORT`` when set, else both services' default ports: one
image runs either service (its default command is the generator, on 50052), and a container
runs one of them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from grpc_health.v1 import health_pb2

from loraforge_core.launch import health_status

DEFAULT_PORTS = (50052, 50051)  # the generator's, the trainer's


def candidate_ports(port: int | None, env: Mapping[str, str]) -> tuple[int, ...]:
    if port is not None:
        return (port,)
    if env.get("LORAFORGE_PORT"):
        return (int(env["LORAFORGE_PORT"]),)
    return DEFAULT_PORTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--service", default="")
    args = parser.parse_args(argv)
    statuses = [
        health_status(f"127.0.0.1:{port}", args.service, timeout=5)
        for port in candidate_ports(args.port, os.environ)
    ]
    serving = health_pb2.HealthCheckResponse.SERVING in statuses
    print("SERVING" if serving else f"not serving ({statuses})")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
