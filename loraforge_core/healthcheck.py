"""``python -m loraforge_core.healthcheck [--port P]``: exit 0 when the local server is SERVING.

For container HEALTHCHECKs (Kubernetes uses its native gRPC probes instead).
"""

from __future__ import annotations

import argparse
import os
import sys

from grpc_health.v1 import health_pb2

from loraforge_core.launch import health_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("LORAFORGE_PORT", 50051)))
    parser.add_argument("--service", default="")
    args = parser.parse_args(argv)
    status = health_status(f"127.0.0.1:{args.port}", args.service, timeout=5)
    serving = status == health_pb2.HealthCheckResponse.SERVING
    print("SERVING" if serving else f"not serving ({status})")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
