"""Processes that ragbatch's work starts end with the process that started them, also one killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tasks.child_process import REAP_GRACE_SECONDS, REAP_POLL_SECONDS

from .conftest import ROOT
from .test_cli import assert_all_end

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

STARTS_AN_ENGINE_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.llm import VLLMGenerator

    generator = VLLMGenerator(model=sys.argv[1], max_model_len=512, kv_cache_gib=1, cache_dir=Path(sys.argv[2]))
    _ = generator.llm
    print("ready", flush=True)
    time.sleep(600)
""")


def kill_when_ready(command: list[str], env: dict[str, str], *, timeout: float) -> list[psutil.Process]:
    """Start `command`, wait for it to print "ready" and for the watcher to have seen its processes,
    SIGKILL it; the processes it had started."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + timeout
        for line in process.stdout:  # vLLM logs to stdout too
            if line.strip() == "ready" or time.monotonic() > deadline:
                break
        assert line.strip() == "ready", f"the process did not get ready (exit {process.poll()})"
        time.sleep(2 * REAP_POLL_SECONDS)
        descendants = psutil.Process(process.pid).children(recursive=True)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return descendants


def test_a_killed_process_takes_the_processes_it_started_along():
    descendants = kill_when_ready([sys.executable, "-c", STARTS_A_TREE], dict(os.environ), timeout=60)
    commands = [" ".join(process.cmdline()) for process in descendants]
    assert sum(command == "sleep 300" for command in commands) == 2 and any("tasks.child_process reap" in c for c in commands)
    assert_all_end(descendants, timeout=REAP_GRACE_SECONDS + 10, after="their parent was killed")  # the watcher too


def test_a_killed_process_takes_vllms_engine_process_along(tiny_llm_dir: Path, tmp_path: Path):
    """On a GPU vLLM runs its engine in a process of its own (here switched on by hand); it outlived a
    killed command before, holding the model's memory."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    command = [sys.executable, "-c", STARTS_AN_ENGINE_PROCESS, str(tiny_llm_dir), str(tmp_path / "cache")]
    descendants = kill_when_ready(command, env, timeout=300)
    assert any("EngineCore" in process.name() for process in descendants), [p.name() for p in descendants]
    assert_all_end(descendants, timeout=REAP_GRACE_SECONDS + 10, after="the command holding the engine was killed")
