"""Processes ragbatch starts: servers on a free loopback port, and everything ending with the process
that started it (a child process that outlives its command keeps its port, its memory, a whole model
for an LLM server or engine, and its database, until someone finds it).

Run as `python -m tasks.child_process supervise GRACE_SECONDS -- COMMAND...` it supervises COMMAND
(see `supervise`), for servers that do not stop cleanly on one signal to their main process; as
`python -m tasks.child_process reap PID GRACE_SECONDS` it is the watcher `end_descendants_with_this_process`
starts.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress

import psutil

from tasks.errors import AddressError, PortInUseError

_PR_SET_PDEATHSIG = 1
REAP_GRACE_SECONDS = 10.0
REAP_POLL_SECONDS = 1.0
# Set in a watched process's environment, so every process it starts afterwards carries it.
REAP_MARK_VARIABLE = "RAGBATCH_ENDS_WITH"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_address(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets as URLs write it."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def require_free_port(host: str, port: int) -> None:
    """Raise `PortInUseError` when something holds `host:port` already, `AddressError` when `host` is no
    address of this machine (a name that does not resolve, another machine's address): a server
    started there would fail with a traceback of its own, after its start-up. Probed as vLLM's and
    Prefect's servers bind: one socket, IPv6 for an IPv6 address, else IPv4."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        kind, protocol, address = next((kind, protocol, address) for _, kind, protocol, _, address
                                       in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM))
    except (socket.gaierror, UnicodeError) as exc:  # UnicodeError: a name no DNS label can hold
        raise AddressError(f"--host {host}: {getattr(exc, 'strerror', None) or exc}") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"{host}:{port} is already in use; pick another port with --port") from None
            raise AddressError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None


def die_with_parent() -> None:
    """`preexec_fn` for a server's process: default SIGINT and SIGTERM handling (a shell that starts
    ragbatch in the background makes it ignore SIGINT, and children inherit that), and on Linux
    SIGTERM as soon as the parent dies, also when the parent is killed with SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_group(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGINT, then SIGTERM, then SIGKILL to the child's process group, waiting `grace_seconds` for each;
    then the same wait for its descendants in other groups (Prefect's server runs uvicorn in its own)."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(grace_seconds)
            break
        except subprocess.TimeoutExpired:
            continue
    _kill_survivors(descendants, grace_seconds)
    process.wait()


def _kill_survivors(processes: list[psutil.Process], grace_seconds: float) -> None:
    """Wait up to `grace_seconds` for `processes` to end, then SIGKILL the ones still running."""
    _, alive = psutil.wait_procs(processes, timeout=grace_seconds)
    for process in alive:
        with suppress(psutil.NoSuchProcess):
            process.kill()


def supervised(command: list[str], grace_seconds: float) -> list[str]:
    """`command` run under `supervise` in a process of its own (start that with `die_with_parent`)."""
    return [sys.executable, "-m", "tasks.child_process", "supervise", str(grace_seconds), "--", *command]


class _Stop(Exception):
    pass


def supervise(command: list[str], grace_seconds: float) -> int:
    """Run `command` in a process group of its own until it exits; its exit status (128 + the signal
    that ended it). SIGTERM or SIGINT here (also from this process's parent dying) stops the whole
    group with `stop_group`. vLLM's OpenAI server needs that: its engine process outlives the API
    server when that alone is killed, and the API server ignores SIGTERM while it starts up."""
    child = subprocess.Popen(command, process_group=0, preexec_fn=die_with_parent)
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        child.wait()
    except _Stop:
        stop_group(child, grace_seconds)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def end_descendants_with_this_process() -> None:
    """Make sure the processes this one starts from now on end with it, also when it is killed with SIGKILL.

    For work that starts processes of its own in this one (vLLM's engine process on a GPU, a local
    Ray or Dask cluster): a killed process cannot stop them itself, and vLLM's engine process keeps
    running without its parent, holding the model's memory. One watcher per process (see `reap`), in
    a process group of its own so that Ctrl-C in a terminal does not end it first.
    """
    _watcher(os.getpid())


@functools.cache
def _watcher(pid: int) -> subprocess.Popen:
    """Marks this process's environment (see `reap`); the watcher runs without this process's stdout
    and stderr: a pipe reading them would wait for the watcher too."""
    mark = f"{pid}-{psutil.Process(pid).create_time()}"
    os.environ[REAP_MARK_VARIABLE] = mark
    return subprocess.Popen([sys.executable, "-m", "tasks.child_process", "reap", str(pid), str(REAP_GRACE_SECONDS), mark],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            process_group=0)


def reap(parent_pid: int, grace_seconds: float, mark: str, poll_seconds: float = REAP_POLL_SECONDS) -> None:
    """Wait for this process's parent `parent_pid` to end, noting its descendants every `poll_seconds`;
    then SIGTERM those still running and every process started with `mark` in its environment, and
    SIGKILL them after `grace_seconds`.

    The descendants are noted while the parent lives because once it is gone they belong to init.
    The mark finds the ones started since the last look (or that left the tree), unless they were
    started with an environment of their own.
    """
    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    with suppress(psutil.NoSuchProcess):
        parent = psutil.Process(parent_pid)
        while os.getppid() == parent_pid:
            current = {process.pid: process for process in parent.children(recursive=True) if process.pid != me}
            known = {pid: process for pid, process in known.items() if process.is_running()} | current
            time.sleep(poll_seconds)
    known |= {process.pid: process for process in _marked(mark) if process.pid != me}
    survivors = [process for process in known.values() if process.is_running()]
    for process in survivors:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _kill_survivors(survivors, grace_seconds)


def _marked(mark: str) -> list[psutil.Process]:
    """The processes (of this user) whose environment holds `mark`."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            if process.environ().get(REAP_MARK_VARIABLE) == mark:
                found.append(process)
    return found


if __name__ == "__main__":
    if sys.argv[1] == "reap":
        reap(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(supervise(sys.argv[4:], float(sys.argv[2])))
