"""Processes that ragbatch's work and commands start end with the process that started them, also one
killed with SIGKILL."""

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tasks.child_process import REAP_GRACE_SECONDS, REAP_POLL_SECONDS

from .conftest import ROOT

STARTS_A_TREE = textwrap.dedent("""
    import subprocess, sys, time
    from tasks.child_process import end_descendants_with_this_process

    end_descendants_with_this_process()
    subprocess.Popen(["sleep", "300"])                                      # a child
    subprocess.Popen(["sh", "-c", "sleep 300 & wait"])                      # and its own child
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                     process_group=0)                                       # deaf to SIGTERM, in a group of its own
    print("ready", flush=True)
    time.sleep(300)
""")

STARTS_AND_DIES = textwrap.dedent("""
    import os, subprocess, sys
    from tasks.child_process import end_descendants_with_this_process

    end_descendants_with_this_process()
    started = [subprocess.Popen(["sleep", "301"], stdout=subprocess.DEVNULL).pid]  # a child
    subprocess.run(["sh", "-c", "sleep 302 >/dev/null & echo $!"])                 # one that left the tree at once
    print(*started, flush=True)
    os.kill(os.getpid(), 9)                                                        # before the watcher looked
""")

RUNS_A_FLOW = textwrap.dedent("""
    import sys
    from flows.ingest import ingest
    from tasks.settings import IngestParams

    ingest(IngestParams(source=sys.argv[1], collection="killed"))
""")


def assert_all_end(processes: list[psutil.Process], *, timeout: float, after: str) -> None:
    """Every one of `processes` ends within `timeout` s; the ones that do not are killed, and named."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    leftovers = [" ".join(process.cmdline()) for process in alive]
    for process in alive:
        process.kill()
    assert not leftovers, f"still running after {after}: {leftovers}"


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], *, timeout: float) -> list[psutil.Process]:
    """Wait until `ready()` and for the watcher to have seen the processes that `process` started,
    SIGKILL it; those processes."""
    return kill_all_when({process: ready}, timeout=timeout)[process]


def kill_all_when(ready: dict[subprocess.Popen, Callable[[], bool]], *, timeout: float) -> dict[subprocess.Popen, list[psutil.Process]]:
    """`kill_when` for processes running side by side: each is killed once all are ready."""
    try:
        deadline = time.monotonic() + timeout
        waiting = dict(ready)
        while waiting:
            for process, is_ready in list(waiting.items()):
                assert process.poll() is None and time.monotonic() < deadline, f"a process ended or stalled (exit {process.poll()})"
                if is_ready():
                    del waiting[process]
        time.sleep(2 * REAP_POLL_SECONDS)
        return {process: psutil.Process(process.pid).children(recursive=True) for process in ready}
    finally:
        for process in ready:
            process.kill()
            process.wait()


def python(code: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def says_ready(process: subprocess.Popen) -> Callable[[], bool]:
    return lambda: process.stdout.readline().strip() == "ready"  # vLLM logs to stdout too


def flow_runs(data_dir: Path) -> Callable[[], bool]:
    """The ingest flow has started writing (so its Prefect API server is up)."""
    return lambda: time.sleep(0.2) or (data_dir / "edge" / "collections").is_dir()


def runs_uvicorn(process: psutil.Process) -> bool:
    try:
        return "uvicorn" in process.cmdline()
    except psutil.Error:  # ended meanwhile
        return False


def without_prefect_api(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, "RAGBATCH_DATA_DIR": str(data_dir)}


def test_a_killed_process_takes_the_processes_it_started_along():
    process = python(STARTS_A_TREE, env=dict(os.environ))
    descendants = kill_when(process, says_ready(process), timeout=60)
    commands = [" ".join(child.cmdline()) for child in descendants]
    assert sum(command == "sleep 300" for command in commands) == 2 and any("tasks.child_process reap" in c for c in commands)
    assert_all_end(descendants, timeout=REAP_GRACE_SECONDS + 10, after="their parent was killed")  # the watcher too


def test_processes_started_just_before_a_kill_end_too():
    """The watcher notes the tree once a second; what was started since, or left the tree, carries the
    process's mark in its environment."""
    output = subprocess.run([sys.executable, "-c", STARTS_AND_DIES], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, timeout=60).stdout
    started = [int(pid) for pid in output.split()]
    assert len(started) == 2
    deadline = time.monotonic() + REAP_GRACE_SECONDS + 10
    while (alive := [pid for pid in started if running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        psutil.Process(pid).kill()
    assert not alive, "sleeps started just before their parent was killed are still running"


def running(pid: int) -> bool:
    """Not ended (the watcher's victims are orphans: init reaps them, a moment later)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_command_or_flow_run_takes_its_temporary_prefect_server_along(corpus: Path, data_dir: Path):
    """Without PREFECT_API_URL a command runs a Prefect server of its own, and a flow called from Python
    one that Prefect starts; both outlived a killed process before, holding their port and database.
    The two are SIGKILLed mid-run side by side; nothing stays."""
    command_dir, flow_dir = data_dir / "command", data_dir / "flow"
    command = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(corpus), "--collection", "killed"],
                               env=without_prefect_api(command_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flow = python(RUNS_A_FLOW, str(corpus), env=without_prefect_api(flow_dir))

    def flow_runs_on_its_server() -> bool:  # under load the server showed up in the tree after the run had started writing
        return flow_runs(flow_dir)() and any(runs_uvicorn(child) for child in psutil.Process(flow.pid).children(recursive=True))

    descendants = kill_all_when({command: flow_runs(command_dir), flow: flow_runs_on_its_server}, timeout=300)
    assert descendants[command], "no Prefect server process found for the command"
    assert any(runs_uvicorn(child) for child in descendants[flow]), "no Prefect server process found for the flow run"
    assert_all_end([*descendants[command], *descendants[flow]], timeout=30, after="the command and the flow run were killed")


def test_a_port_is_probed_on_the_hosts_own_address_family_and_only_a_taken_one_is_in_use():
    """Every probe was an IPv4 socket and every failure "already in use": `--host ::1` could never serve,
    and a name that does not resolve or another machine's address was reported as a taken port."""
    import socket

    import pytest

    from tasks.child_process import free_port, http_address, require_free_port
    from tasks.errors import AddressError, PortInUseError

    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(PortInUseError, match=rf"^127.0.0.1:{taken.getsockname()[1]} is already in use"):
            require_free_port("127.0.0.1", taken.getsockname()[1])
    require_free_port("127.0.0.1", free_port())
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            ipv6_port = probe.getsockname()[1]
        require_free_port("::1", ipv6_port)
    with pytest.raises(AddressError, match=r"^--host no-such-host.invalid: "):
        require_free_port("no-such-host.invalid", 8000)
    with pytest.raises(AddressError, match=r"^cannot listen on 192.0.2.1:8000: Cannot assign requested address; check --host"):
        require_free_port("192.0.2.1", 8000)  # TEST-NET-1: no machine's address
    assert http_address("::1", 8000) == "http://[::1]:8000" and http_address("127.0.0.1", 80) == "http://127.0.0.1:80"
