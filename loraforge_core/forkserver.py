"""A preloaded parent that forks servers, started by ``start(socket_path, preloads)``: each
preload a module to import or a ``module:function`` to call, once.

A generator spends about 6 s of CPU importing torch, diffusers, transformers and peft before it
serves, a trainer's zygote as much, and the test suite starts dozens of each. Where
``LORAFORGE_FORKSERVER`` names this process's socket, ``launch.ServerProcess`` asks it for the
server instead of exec'ing Python: the forkserver imported the stack once and forks (a trainer
forks its zygote from itself at its start, so the zygote inherits it too); the child is the real
server, ``python -m MODULE ARGV`` as an exec'd one runs it (its ``__main__`` through runpy,
that command line in ``ps``, the caller's environment, working folder and log files), in its
own pid. Production, the demo and the benchmarks exec their servers; the tests start a
forkserver per worker (tests/conftest.py). Servers are forked only from a process that has run
no thread and no torch operation, and it preloads libraries only, never a service's modules.

Protocol (SOCK_SEQPACKET, a connection per child): the caller sends one JSON object
``{"module", "argv", "env", "cwd"}`` with two descriptors attached (the child's stdout and
stderr); the answer is ``{"started": pid}``, later ``{"exited": code}`` (negative for a
signal), or ``{"refused": why}`` when the child would not be what an exec'd one is: the
caller then exec's. The forkserver exits when its stdin closes (its parent closed it, or died)
or on SIGTERM; its children run on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

ENV = "LORAFORGE_FORKSERVER"
TITLE = "loraforge forkserver"
SERVICES = ("inference_service", "trainer_service")
MAX_REQUEST = 1 << 20  # a request's JSON: the child's environment and arguments
# What the preloaded libraries read from the environment as they are imported: a child asking
# for other values would not get them, so it is exec'd. Not LD_*: the loader reads it once, as
# a process starts (a library that amends LD_LIBRARY_PATH, as OpenCV does, amends it for the
# processes its process execs, which the child's environment still reaches).
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
                   "CUDA_", "OMP_", "MKL_", "PYTHON")  # fmt: skip


def _import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}


class ForkedServer:
    """A child of the forkserver, with what ``ServerProcess`` uses of ``subprocess.Popen``:
    ``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate`` and ``kill``."""

    def __init__(self, pid: int, connection: socket.socket, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._connection = connection  # its exit status comes here

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_exit(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not self._read_exit(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # ended: its pid may be another process's now
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read_exit(self, timeout: float | None) -> bool:
        self._connection.settimeout(timeout)
        try:
            message = self._connection.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        # No message: the forkserver is gone, and with it the exit status (-1 says unknown).
        self.returncode = json.loads(message)["exited"] if message else -1
        self._connection.close()
        return True


def spawn(module: str, argv: list[str], env: dict[str, str], log: int) -> ForkedServer | None:
    """``python -m module argv`` forked by the forkserver named in ``env``, its output on the
    descriptor ``log``; None where there is none or it refuses (the caller exec's)."""
    path = env.get(ENV)
    if not path:
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(path)
        request = {"module": module, "argv": argv, "env": env, "cwd": os.getcwd()}
        socket.send_fds(connection, [json.dumps(request).encode()], [log, log])
        answer = json.loads(connection.recv(4096) or b'{"refused": "it exited"}')
    except OSError as err:
        connection.close()
        warnings.warn(f"the forkserver at {path} did not answer ({err}); exec'ing {module}",
                      stacklevel=2)  # fmt: skip
        return None
    if "started" not in answer:
        connection.close()
        warnings.warn(f"the forkserver refused {module}: {answer['refused']}; exec'ing it",
                      stacklevel=2)  # fmt: skip
        return None
    return ForkedServer(answer["started"], connection, [sys.executable, "-m", module, *argv])


# ---------------------------------------------------------------------- the forkserver itself
def main(argv: list[str] | None = None) -> int:
    """``python -m loraforge_core.forkserver FD PRELOAD...``: FD is the listening socket."""
    from setproctitle import setproctitle  # here: it takes over the command line's memory

    fd, *preloads = argv if argv is not None else sys.argv[1:]
    listener = socket.socket(fileno=int(fd))
    setproctitle(f"{TITLE} {listener.getsockname()}")
    before = dict(os.environ)
    for preload in preloads:
        module, _, function = preload.partition(":")
        imported = importlib.import_module(module)
        if function:
            getattr(imported, function)()
    if services := sorted(m for m in sys.modules if m.split(".")[0] in SERVICES):
        sys.exit(
            f"preload libraries only, not {services}: what a service module sets up as it "
            "is imported (its metrics registry) would be in every server forked here"
        )
    # What the imports set themselves (torch's inductor cache folder): an exec'd child's
    # imports would set it too.
    added = {k: v for k, v in os.environ.items() if k not in before}
    return _serve(listener, before, added)


def _serve(listener: socket.socket, env: dict[str, str], added: dict[str, str]) -> int:
    child_ended_r, child_ended_w = os.pipe()
    os.set_blocking(child_ended_w, False)
    signal.set_wakeup_fd(child_ended_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the pipe
    callers: dict[int, socket.socket] = {}  # child pid -> the connection awaiting its exit
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(child_ended_r, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            if key.fileobj is sys.stdin:
                if not os.read(sys.stdin.fileno(), 4096):  # the parent is done, or gone
                    return 0
                continue
            if key.fileobj is child_ended_r:
                os.read(child_ended_r, 4096)
                _report_ended(callers)
                continue
            connection, _ = listener.accept()
            try:
                message, fds, _, _ = socket.recv_fds(connection, MAX_REQUEST, 2)
                request = json.loads(message)
            except (OSError, ValueError):
                connection.close()
                continue
            if refusal := _refusal(request, fds, env, added):
                connection.send(json.dumps({"refused": refusal}).encode())
                connection.close()
                for fd in fds:
                    os.close(fd)
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                events.close()
                for fd in (child_ended_r, child_ended_w):
                    os.close(fd)
                for open_socket in (listener, connection, *callers.values()):
                    open_socket.close()
                return _become(request, fds, added)
            for fd in fds:
                os.close(fd)
            callers[pid] = connection
            with contextlib.suppress(OSError):  # a caller gone: the child runs on regardless
                connection.send(json.dumps({"started": pid}).encode())


def _refusal(request: dict, fds: list[int], env: dict[str, str], added: dict[str, str]) -> str:
    if len(fds) != 2:
        return "send the child's stdout and stderr"
    asked = _import_time_env(request["env"])
    asked = {k: v for k, v in asked.items() if added.get(k) != v}  # as the imports set it
    differ = sorted(set(asked.items()) ^ set(_import_time_env(env).items()))
    if differ:
        names = sorted({name for name, _ in differ})
        return f"the libraries read {', '.join(names)} as they are imported, set otherwise here"
    return ""


def reaped() -> Iterator[tuple[int, int]]:
    """Each ended child not yet waited for: its pid and exit code (as ``Popen.returncode``
    and asyncio's: negative for a signal). For a parent woken by SIGCHLD."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def _report_ended(callers: dict[int, socket.socket]) -> None:
    for pid, code in reaped():
        connection = callers.pop(pid, None)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.send(json.dumps({"exited": code}).encode())
            connection.close()


def become_child(fds: list[int], env: dict[str, str], module: str, argv: list[str]) -> None:
    """In a child just forked from a preloading parent (this forkserver, the trainer's zygote):
    the default SIGCHLD, stdin on /dev/null, stdout and stderr on the two ``fds``, ``env`` as
    the whole environment, and ``python -m module argv`` as its command line and ``sys.argv``."""
    from setproctitle import setproctitle  # imported by the parent: see main

    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, sys.stdin.fileno())
    os.close(null)
    os.dup2(fds[0], sys.stdout.fileno())
    os.dup2(fds[1], sys.stderr.fileno())
    for fd in fds:
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    setproctitle(" ".join([sys.executable, "-m", module, *argv]))
    sys.argv = [module, *argv]


def _become(request: dict, fds: list[int], added: dict[str, str]) -> int:
    """Turn this forked child into ``python -m module argv``."""
    become_child(fds, added | request["env"], request["module"], request["argv"])
    os.chdir(request["cwd"])
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    return 0


def start(path: Path, preloads: list[str]) -> subprocess.Popen[bytes]:
    """Start a forkserver listening at ``path`` (its own output in ``path``.log) that imports
    or calls each of ``preloads``; it preloads while the caller goes on, and exits when the
    caller closes its ``stdin`` (or dies)."""
    # Listening before it starts: callers that come during the preload wait in the backlog.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(str(path))
        listener.listen(64)
        fd = listener.fileno()
        command = [sys.executable, "-m", "loraforge_core.forkserver", str(fd), *preloads]
        with open(path.with_suffix(".log"), "ab") as log:
            return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                    pass_fds=[fd])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
