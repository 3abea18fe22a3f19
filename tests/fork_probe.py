"""``python -m tests.fork_probe CODE``: prints what a started process sees of itself as JSON,
then exits with CODE ("wait": waits for a signal to end it). Run by tests/test_forkserver.py."""

import json
import os
import signal
import sys

import psutil

if __name__ == "__main__":
    me = psutil.Process()
    seen = {"argv": sys.argv[1:], "probe": os.environ.get("PROBE"), "cwd": os.getcwd(),
            "cmdline": me.cmdline(), "parent": me.ppid(), "stdin": sys.stdin.read()}  # fmt: skip
    print(json.dumps(seen), flush=True)
    if sys.argv[1] == "wait":
        signal.pause()
    sys.exit(int(sys.argv[1]))
