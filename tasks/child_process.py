"""Servers ragbatch starts: on a free loopback port, and ending with it (a child process that
outlives its command keeps its port, its memory, a whole model for an LLM server, and its database,
until someone finds it).

Run as `python -m tasks.child_process GRACE_SECONDS -- COMMAND...` it supervises COMMAND (see
`supervise`), for servers that do not stop cleanly on one signal to their main process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

import psutil

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    _, alive = psutil.wait_procs(descendants, timeout=grace_seconds)
    for leftover in alive:
        leftover.kill()
    process.wait()


def supervised(command: list[str], grace_seconds: float) -> list[str]:
    """`command` run under `supervise` in a process of its own (start that with `die_with_parent`)."""
    return [sys.executable, "-m", "tasks.child_process", str(grace_seconds), "--", *command]


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


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[3:], float(sys.argv[1])))
