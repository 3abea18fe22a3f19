"""``python -m trainer_service.training.tethered CMD ARGS...``: run CMD tied to this process's
parent (Linux PR_SET_PDEATHSIG survives exec), so a launcher like torch.distributed.run dies
with the server that started it. The server cannot set it itself between fork and exec: its
threads make Python code there unsafe (preexec_fn crashed children with SIGSEGV)."""

from __future__ import annotations

import os
import sys

from trainer_service.training.run import die_with_parent

if __name__ == "__main__":
    die_with_parent()
    os.execv(sys.argv[1], sys.argv[1:])
