"""A preloaded parent for training processes: ``python -m trainer_service.training.zygote``.

A training process spends about 5.5 s of CPU importing torch, diffusers, transformers and peft
before its first step, on every job, resume and retry. The trainer server keeps one zygote
that imports them once (and touches no device) and forks each single-process job's training
process from it: the child starts with everything imported, in its own session, with the
job's environment, its stdout on the pipe the server reads events from and its stderr on the
job's log, and then runs ``training.run`` as an exec'd process would. ``ps`` shows it as
``trainer_service.training.run --job-dir ...``.

A server forks its first zygote as its first act (``fork_first``, while it runs one thread):
where the server itself was forked from a preloaded process (the tests' forkserver) the zygote
then imports nothing; a zygote that died is replaced by an exec'd one.

Protocol, on the zygote's stdin (a SOCK_SEQPACKET socket: one message per request): a JSON
object ``{"argv": [...], "env": {...}}`` with two descriptors attached (the child's stdout and
stderr). On its stdout, one JSON line per event: ``{"started": pid}`` for each request, in
order, then ``{"exited": pid, "code": c}`` when that child ends (``c`` as asyncio reports it:
negative for a signal). The zygote exits when its stdin closes or its parent dies; its children
then get SIGTERM (each ties itself to its parent) and stop at their next step, as they do when
a server dies, and their jobs go back to the queue; the next job starts a new zygote.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import selectors
import signal
import socket
import sys

from loraforge_core import forkserver
from trainer_service.training.run import EXIT_CANCELLED

MAX_REQUEST = 1 << 20  # a request's JSON: the job's environment and arguments
UNREPORTED_EXIT_S = 2.0  # how long an ended child's exit status may take to be reported
TITLE = "loraforge training zygote"


class ForkedProcess:
    """A training process the zygote forked, with what the job runner uses of
    ``asyncio.subprocess.Process``: ``pid``, ``stdout``, ``returncode``, ``wait`` and
    ``send_signal``."""

    def __init__(
        self, pid: int, stdout: asyncio.StreamReader, pipe: asyncio.BaseTransport,
        ended: asyncio.Future,
    ) -> None:  # fmt: skip
        self.pid = pid
        self.stdout = stdout
        self._pipe = pipe
        self._ended = ended
        # Its end is seen without the zygote too (a zygote frozen or gone never reports it):
        # a pidfd turns readable when the process ends, whoever its parent is.
        with contextlib.suppress(ProcessLookupError):  # already ended: the report will come
            self._pidfd = os.pidfd_open(pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._gone)

    def _gone(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        loop.call_later(UNREPORTED_EXIT_S, self._unreported)

    def _unreported(self) -> None:
        if not self._ended.done():  # its job resumes from its last checkpoint
            self._ended.set_result(EXIT_CANCELLED)

    @property
    def returncode(self) -> int | None:
        return self._ended.result() if self._ended.done() else None

    async def wait(self) -> int:
        code = await asyncio.shield(self._ended)
        self._pipe.close()  # the runner has read what it wanted of stdout (or killed it)
        return code

    def send_signal(self, sig: int) -> None:
        if self._ended.done():  # reaped: its pid may be another process's now
            raise ProcessLookupError(self.pid)
        os.kill(self.pid, sig)


class Zygote:
    """The server's side: starts the zygote on first use (and again if it died), forks
    training processes from it, and learns from it when each ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # the longest event line a child's stdout may carry
        self._process: asyncio.subprocess.Process | FirstZygote | None = None
        self._control: socket.socket | None = None
        self._turn = asyncio.Lock()
        self._starting: collections.deque[asyncio.Future] = collections.deque()
        self._ended: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task[None] | None = None

    async def spawn(self, argv: list[str], env: dict[str, str], stderr: int) -> ForkedProcess:
        """A training process running ``training.run`` with ``argv`` and ``env``, its stderr
        on the descriptor ``stderr``."""
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        try:
            async with self._turn:
                control = await self._running()
                started = loop.create_future()
                self._starting.append(started)
                request = json.dumps({"argv": argv, "env": env}).encode()
                socket.send_fds(control, [request], [write_end, stderr])
                pid = await started
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        stdout = asyncio.StreamReader(limit=self.limit)
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_end, "rb", 0)
        )
        return ForkedProcess(pid, stdout, pipe, self._ended[pid])

    async def close(self) -> None:
        """End the zygote (its stdin closes); its children, if any, get SIGTERM."""
        await self._adopt_first()  # never used: it ends as the others do
        process, self._process = self._process, None
        if self._control is not None:
            self._control.close()
            self._control = None
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout=10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reader is not None:
            await self._reader

    async def _adopt_first(self) -> None:
        """Take over the zygote this process forked at its start, if it has not yet."""
        global _first
        if self._process is not None or _first is None:
            return
        first, _first = _first, None
        if (await first.adopt(self.limit)).returncode is None:
            self._process, self._control = first, first.control
            self._reader = asyncio.create_task(self._read_reports(first), name="training-zygote")
        else:  # it died before its first job: the next start execs another
            first.control.close()

    async def _running(self) -> socket.socket:
        await self._adopt_first()
        if self._process is None or self._process.returncode is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with theirs:
                self._process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "trainer_service.training.zygote", stdin=theirs,
                    stdout=asyncio.subprocess.PIPE, start_new_session=True,
                )  # fmt: skip
            self._control = ours
            self._reader = asyncio.create_task(
                self._read_reports(self._process), name="training-zygote"
            )
        assert self._control is not None
        return self._control

    async def _read_reports(self, process: asyncio.subprocess.Process | FirstZygote) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            report = json.loads(line)
            if "started" in report:
                self._ended[report["started"]] = asyncio.get_running_loop().create_future()
                self._starting.popleft().set_result(report["started"])
            else:
                ended = self._ended.pop(report["exited"])
                if not ended.done():
                    ended.set_result(report["code"])
        # The zygote ended: its children got SIGTERM (they stop at their next step and exit).
        await process.wait()
        while self._starting:
            self._starting.popleft().set_exception(
                RuntimeError(f"the training zygote exited with code {process.returncode}")
            )
        for ended in self._ended.values():  # stopped as a dying server's children stop
            if not ended.done():
                ended.set_result(EXIT_CANCELLED)
        self._ended.clear()


class FirstZygote:
    """A zygote forked by ``fork_first``, until the server's ``Zygote`` adopts it: what that
    uses of ``asyncio.subprocess.Process`` (``stdout``, ``returncode``, ``wait``, ``kill``)."""

    def __init__(self, pid: int, control: socket.socket, reports: int) -> None:
        self.pid = pid
        self.control = control
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = None
        self._reports = reports
        self._ended: asyncio.Future | None = None

    async def adopt(self, limit: int) -> FirstZygote:
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:  # it died before its first job
            os.close(self._reports)
            self.returncode = os.waitstatus_to_exitcode(status)
            self._ended.set_result(self.returncode)
            return self
        self.stdout = asyncio.StreamReader(limit=limit)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.stdout), os.fdopen(self._reports, "rb", 0)
        )
        pidfd = os.pidfd_open(self.pid)  # our child: not reaped until we wait for it

        def ended() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            self._ended.set_result(self.returncode)

        loop.add_reader(pidfd, ended)
        return self

    async def wait(self) -> int:
        assert self._ended is not None
        return await asyncio.shield(self._ended)

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


_first: FirstZygote | None = None  # forked at the start, not yet adopted


def fork_first() -> None:
    """Fork this process's first zygote now, while it runs one thread: a server calls this
    before it starts any (fork is unsafe after). ``Zygote`` adopts it on first use."""
    global _first
    import setproctitle  # noqa: F401  before the fork: it takes over the command line's memory

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reports_r, reports_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the zygote: as an exec'd one, its stdin the control socket, its stdout
        os.setsid()  # the reports, its stderr the server's, nothing else open
        os.dup2(theirs.fileno(), sys.stdin.fileno())
        os.dup2(reports_w, sys.stdout.fileno())
        ours.detach()  # both closed below, by number
        theirs.detach()
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        sys.exit(main())
    theirs.close()
    os.close(reports_w)
    _first = FirstZygote(pid, ours, reports_r)


def preload() -> None:
    """Import what every training process uses (a process forked after this skips it)."""
    import trainer_service.training.trainer  # noqa: F401
    from trainer_service.training import base_model

    base_model.preload()


def main() -> int:
    from setproctitle import setproctitle

    from loraforge_core.logs import configure_logging
    from trainer_service.training import run

    run.die_with_parent()
    setproctitle(TITLE)
    configure_logging("info")  # before the libraries speak: what they log is JSON
    preload()

    control = socket.socket(fileno=sys.stdin.fileno())
    reports = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not reach the server
    child_ended_r, child_ended_w = os.pipe()
    os.set_blocking(child_ended_w, False)
    signal.set_wakeup_fd(child_ended_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through the pipe
    events = selectors.DefaultSelector()
    events.register(control, selectors.EVENT_READ)
    events.register(child_ended_r, selectors.EVENT_READ)
    while True:
        for key, _ in events.select():
            if key.fileobj is child_ended_r:
                os.read(child_ended_r, 4096)
                _report_ended(reports)
                continue
            message, fds, _, _ = socket.recv_fds(control, MAX_REQUEST, 2)
            if not message:  # the server closed its end: no more jobs
                return 0
            request = json.loads(message)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the training process
                events.close()
                reports.close()
                control.detach()  # fd 0: the child's stdin becomes /dev/null
                for fd in (child_ended_r, child_ended_w):
                    os.close(fd)
                return _become_training_process(request, fds)
            for fd in fds:
                os.close(fd)
            reports.write(json.dumps({"started": pid}) + "\n")


def _report_ended(reports) -> None:
    for pid, code in forkserver.reaped():
        reports.write(json.dumps({"exited": pid, "code": code}) + "\n")


def _become_training_process(request: dict, fds: list[int]) -> int:
    from trainer_service.training import run

    os.setsid()
    argv = request["argv"]
    forkserver.become_child(fds, request["env"], "trainer_service.training.run", argv)
    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
