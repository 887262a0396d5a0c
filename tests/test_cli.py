"""The `ragbatch` command as a user runs it: a real subprocess against the session's Prefect server."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dask
import psutil
import pytest

from flows.cli import build_parser, main, params_from_args

from .conftest import ROOT
from .test_child_process import assert_all_end
from .test_store import closed_port

REQUIRED_KEYS = {"collection", "loaded", "valid", "quarantined", "chunks", "embedded", "upserted", "deleted", "unchanged", "seconds"}


def ragbatch(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_ingest_json_ends_stdout_with_the_counts(corpus, subprocess_env, data_dir):
    result = ragbatch("ingest", str(corpus), "--collection", "cli", "--json", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert REQUIRED_KEYS <= counts.keys()
    assert counts["collection"] == "cli" and counts["loaded"] == 36 and counts["embedded"] > 36
    assert (data_dir / "edge" / "collections").is_dir()  # the default store: edge under the data directory


ERROR_CASES = [
    (["ingest", "{tmp}/nope", "--collection", "x"], "{tmp}/nope: no such file or directory"),
    (["ingest", "{tmp}/notes.pdf", "--collection", "x"], "unknown source format '.pdf'"),
    (["ingest", "{tmp}/t.csv", "--collection", "x"], "t.csv: missing required column 'text' (found: id, body)"),
    (["ingest", "{tmp}/t.csv", "--collection", "x", "--format", "jsonl"], "t.csv: 2 of 2 rows (100%) failed validation"),
    (["ingest", "{corpus}", "--collection", "x", "--store", "http://127.0.0.1:{port}"], "cannot reach Qdrant at http://127.0.0.1:{port}"),
    (["ingest", "{corpus}", "--collection", "x", "--store", "qdrant.example"], "unknown store 'qdrant.example'"),
    (["ingest", "{corpus}", "--collection", "x", "--task-runner", "dask", "--cluster-address", "tcp://127.0.0.1:{port}"],
     "cannot reach the dask cluster at tcp://127.0.0.1:{port}: Timed out trying to connect"),
    (["ingest", "{corpus}", "--collection", "x", "--chunk-tokens", "lots"], "invalid --chunk-tokens"),
    (["ingest", "{corpus}", "--collection", "x", "--chunk-tokens", "512"],  # MiniLM reads 256 tokens: the rest was cut off unseen
     "--chunk-tokens 512 is more than all-MiniLM-L6-v2 reads (254 tokens of text): the rest of every chunk would not be embedded"),
    (["ingest", "{corpus}", "--collection", "bad name"], "invalid --collection"),
    (["server", "--project-dir", "{tmp}"], "no prefect.yaml in {tmp}; run from the project directory or pass --project-dir"),
    (["server", "--port", "{listening}", "--project-dir", "{root}"], "127.0.0.1:{listening} is already in use"),
    (["serve", "--port", "{listening}"], "127.0.0.1:{listening} is already in use; pick another port with --port"),
    (["ingest", "{corpus}", "--collection", "x", "--store", "edge:{tmp}/t.csv/edge"], "{tmp}/t.csv/edge/collections: Not a directory"),
    (["ingest", "{corpus}", "--collection", "x", "--store", "local:{tmp}/t.csv"], "{tmp}/t.csv: a file, where a directory is needed"),
    (["ingest", "{corpus}", "--collection", "x", "--data-dir", "{tmp}/t.csv/state"],
     "cannot use {tmp}/t.csv/state as the data directory: {tmp}/t.csv is not a directory; set --data-dir or RAGBATCH_DATA_DIR"),
    (["serve", "--data-dir", "{tmp}/t.csv"], "cannot use {tmp}/t.csv as the data directory: {tmp}/t.csv is not a directory"),
    (["serve", "--llm-model", "{tmp}/broken", "--port", "{port}"], "{tmp}/broken/config.json: not a readable model config"),
    (["server", "--data-dir", "{tmp}/t.csv", "--project-dir", "{root}"], "cannot use {tmp}/t.csv as the data directory"),
    (["models", "prepare", "--data-dir", "{tmp}/t.csv"], "cannot use {tmp}/t.csv as the data directory"),
    (["answer", "{tmp}/q.jsonl", "--collection", "x", "--out", "{tmp}"], "invalid --out: {tmp} is a directory; name a Parquet file"),
    (["evaluate", "--dataset", "{tmp}/q.jsonl", "--collection", "x", "--out", "{tmp}"], "invalid --out: {tmp} is a directory"),
    (["answer", "{tmp}/q.parquet", "--collection", "x", "--out", "{tmp}/q.parquet", "--overwrite"],  # deleted the question set
     "out is the questions file {tmp}/q.parquet; give the answers another file"),
    (["evaluate", "--dataset", "{tmp}/q.jsonl", "--collection", "x", "--answers", "{tmp}/a.parquet", "--out", "{tmp}/a.parquet"],
     "out {tmp}/a.parquet (or the summary beside it) would replace the answers file {tmp}/a.parquet; give the metrics another file"),
]


def fill(args, message, tmp_path, corpus):
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "t.csv").write_text("id,body\n1,x\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama",')  # cut short
    values = {"tmp": tmp_path, "corpus": corpus, "port": closed_port(), "root": ROOT, "listening": LISTENER.getsockname()[1]}
    return [a.format(**values) for a in args], message.format(**values)


LISTENER = socket.create_server(("127.0.0.1", 0))  # a port that is taken, for `ragbatch server`


@pytest.mark.slow
def test_the_commands_write_only_to_the_data_and_output_directories(corpus, subprocess_env, tmp_path, tiny_llm_dir):
    """ingest, answer (with vLLM in the process), evaluate and a failing ingest, run from an empty directory
    with an empty home and temporary directory: afterwards all three are still empty and the corpus is
    unchanged. (Prefect kept a failed task's exception in ~/.prefect/storage whatever PREFECT_HOME said.)"""
    home, scratch, cwd, data, out = (tmp_path / name for name in ("home", "tmp", "cwd", "data", "out"))
    for directory in (home, scratch, cwd):
        directory.mkdir()
    # As a user's shell has it: without what importing `flows` set in this process for its own data directory.
    env = {name: value for name, value in subprocess_env.items() if str(ROOT / ".ragbatch") not in value}
    env.update(HOME=str(home), TMPDIR=str(scratch), RAGBATCH_DATA_DIR=str(data))
    for name in ("XDG_CACHE_HOME", "VLLM_CACHE_ROOT"):
        env.pop(name, None)
    corpus_before = {path: path.read_bytes() for path in corpus.rglob("*") if path.is_file()}
    questions, answers = ROOT / "data" / "questions.jsonl", out / "answers.parquet"
    for command in (
        ["ingest", str(corpus), "--collection", "kb"],
        ["answer", str(questions), "--collection", "kb", "--out", str(answers), "--llm-model", str(tiny_llm_dir),
         "--max-model-len", "1024", "--max-tokens", "8", "--kv-cache-gib", "1"],
        ["evaluate", "--dataset", str(questions), "--collection", "kb", "--answers", str(answers), "--out", str(out / "eval.parquet")],
        ["ingest", str(questions), "--collection", "kb", "--format", "csv"],  # fails in its validate task
    ):
        result = subprocess.run([sys.executable, "-m", "flows.cli", *command], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == (1 if "--format" in command else 0), f"{command[0]}: {result.stderr[-2000:]}"
    for directory in (home, scratch, cwd):
        assert not list(directory.rglob("*")), f"written outside the data and output directories: {list(directory.rglob('*'))}"
    assert {path: path.read_bytes() for path in corpus.rglob("*") if path.is_file()} == corpus_before
    assert sorted(path.name for path in out.iterdir()) == [".answers.parquet.lock", "answers.parquet", "eval.parquet", "eval.summary.json"]


def test_the_data_dir_flag_holds_prefects_state_too(corpus, subprocess_env, tmp_path):
    """Importing `flows` set Prefect's home for RAGBATCH_DATA_DIR or ./.ragbatch (and created it there)
    before --data-dir was read: the database, logs and results of a command given --data-dir went to
    the working directory, where `ragbatch server --data-dir` never looked."""
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    env = {name: value for name, value in subprocess_env.items() if str(ROOT / ".ragbatch") not in value}
    for name in ("RAGBATCH_DATA_DIR", "PREFECT_HOME", "PREFECT_API_URL"):
        env.pop(name, None)
    script = textwrap.dedent("""
        import json, sys
        from flows.cli import _command_params, build_parser
        from tasks.settings import IngestParams
        args = build_parser().parse_args(["ingest", sys.argv[1], "--collection", "kb", "--data-dir", sys.argv[2]])
        _command_params(IngestParams, args, "ingest")
        from prefect.settings import get_current_settings
        settings = get_current_settings()
        print(json.dumps([str(settings.home), str(settings.results.local_storage_path), str(settings.server.memo_store_path)]))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(corpus), str(data)], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    home = data / "prefect"
    assert json.loads(result.stdout.splitlines()[-1]) == [str(home), str(home / "storage"), str(home / "memo_store.toml")]
    assert home.is_dir() and not list(cwd.iterdir())  # the import's ./.ragbatch is gone again
    for args, code in ((["--help"], 0), (["serve", "--port", "0"], 2)):  # commands that end before they run
        result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == code and not list(cwd.iterdir()), (args, result.stderr[-2000:])


def test_each_command_reads_its_own_variables_and_a_relative_data_dir_is_absolute(monkeypatch, tmp_path):
    """RAGBATCH_HOST=0.0.0.0, meant for `ragbatch serve`, put the unauthenticated Prefect server of
    `ragbatch server` on every interface too; a relative data directory meant the project directory to
    that server's workers and the working directory to the command."""
    from tasks.settings import IngestParams, PrefectServerParams, ServeParams

    monkeypatch.setenv("RAGBATCH_HOST", "0.0.0.0")
    monkeypatch.setenv("RAGBATCH_PORT", "8001")
    monkeypatch.setenv("RAGBATCH_SHOW_PROGRESS", "true")
    monkeypatch.chdir(tmp_path)
    served, prefect = ServeParams(), PrefectServerParams(data_dir="state")
    assert (served.host, served.port) == ("0.0.0.0", 8001) and (prefect.ui_host, prefect.ui_port) == ("127.0.0.1", 4200)
    assert prefect.data_dir == tmp_path / "state"
    monkeypatch.setenv("RAGBATCH_UI_PORT", "4300")
    flags = params_from_args(PrefectServerParams, build_parser().parse_args(["server", "--host", "10.0.0.5"]))
    assert (flags.ui_host, flags.ui_port) == ("10.0.0.5", 4300)
    ingest = params_from_args(IngestParams, build_parser().parse_args(["ingest", "docs", "--collection", "kb"]))
    assert "show_progress" in ingest.model_fields_set and ingest.show_progress  # so the terminal's default does not replace it


def test_a_refused_parameter_is_named_as_it_was_set(monkeypatch, tmp_path, capsys):
    """Errors named `--ui-port` for `server --port`, `--parameters` for the parameters together, the flag
    for a value that came from a variable; a list variable that is not JSON was a traceback, even with
    the flag given beside it."""
    for name in ("RAGBATCH_PORT", "RAGBATCH_STOP"):
        monkeypatch.delenv(name, raising=False)
    questions = tmp_path / "q.jsonl"
    not_an_integer = "Input should be a valid integer, unable to parse string as an integer"
    cases = [
        ({}, ["server", "--port", "0"], "invalid --port: Input should be greater than or equal to 1"),
        ({}, ["answer", str(questions), "--collection", "x", "--out", str(questions)],
         f"out is the questions file {questions}; give the answers another file"),
        ({"RAGBATCH_PORT": "x"}, ["serve"], f"invalid RAGBATCH_PORT: {not_an_integer}"),
        ({"RAGBATCH_PORT": "x"}, ["serve", "--port", "y"], f"invalid --port: {not_an_integer}"),
        ({"RAGBATCH_STOP": "###"}, ["answer", str(questions), "--collection", "x", "--stop", "x"],
         """invalid RAGBATCH_STOP: a list is written as JSON in the environment, such as RAGBATCH_STOP='["one", "two"]'"""),
    ]
    for variables, args, message in cases:
        with monkeypatch.context() as scope:
            for name, value in variables.items():
                scope.setenv(name, value)
            assert main(args) == 2
        assert capsys.readouterr().err.strip() == f"ragbatch: error: {message}"


@pytest.mark.parametrize("args, message", ERROR_CASES)
def test_errors_name_the_problem_in_one_line(tmp_path, corpus, prefect_api_url, data_dir, monkeypatch, capsys, args, message):
    monkeypatch.setenv("RAGBATCH_DATA_DIR", str(data_dir))
    args, message = fill(args, message, tmp_path, corpus)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):  # Dask tries an address for 30 s
        assert main(args) != 0
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("ragbatch: error: ")]
    assert message in line


@pytest.mark.parametrize("case", [0, 3, 4, 13])  # source errors before and in a task, a store error, a file error in the flow
def test_a_failing_command_prints_no_traceback(tmp_path, corpus, subprocess_env, case):
    args, message = fill(*ERROR_CASES[case], tmp_path, corpus)
    result = ragbatch(*args, env=subprocess_env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Finished in state Failed" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("ragbatch: error: ")]
    assert message in line


def test_an_unreachable_prefect_api_is_one_line(corpus, subprocess_env):
    """A team's PREFECT_API_URL with its server down: Prefect's client ended the run with a traceback."""
    api = f"http://127.0.0.1:{closed_port()}/api"
    result = ragbatch("ingest", str(corpus), "--collection", "x", env={**subprocess_env, "PREFECT_API_URL": api})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"ragbatch: error: cannot reach the Prefect API at {api} (PREFECT_API_URL): ")
    assert line.endswith("; start that server (`ragbatch server` for a local one), or unset PREFECT_API_URL to run with a temporary one")


def test_a_prefect_api_that_never_answers_is_one_line_too():
    """A server that takes the connection and never answers (hung, or a proxy's black hole) timed out
    with a traceback; only refused connections were one line."""
    from tasks.prefect_server import PrefectServerError, require_reachable_api

    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with pytest.raises(PrefectServerError, match=rf"^cannot reach the Prefect API at {api} \(PREFECT_API_URL\): .*timed out"):
            require_reachable_api(api, timeout=0.5)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, as a team's private CA would issue one."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ragbatch test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, key_file = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key_file


def test_an_https_prefect_api_is_checked_with_prefects_own_certificate_settings(tmp_path):
    """A team's Prefect server behind a private CA: the reachability check used certifi alone and called
    it unreachable, though Prefect's client (PREFECT_API_SSL_CERT_FILE) would have connected."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

    from tasks.prefect_server import PrefectServerError, require_reachable_api

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    cert, key = self_signed_certificate(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"https://127.0.0.1:{server.server_address[1]}/api"
    try:
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: None}):
            with pytest.raises(PrefectServerError, match="CERTIFICATE_VERIFY_FAILED"):
                require_reachable_api(api, timeout=5)
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: str(cert)}):
            require_reachable_api(api, timeout=5)
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: None, PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
            require_reachable_api(api, timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_a_prefect_server_set_in_the_users_profile_is_used(corpus, subprocess_env, tmp_path):
    """`prefect config set PREFECT_API_URL=...` writes ~/.prefect/profiles.toml; the commands keep their
    Prefect home in the data directory and ignored that profile, running on a temporary server instead."""
    api = f"http://127.0.0.1:{closed_port()}/api"
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    (home / ".prefect" / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{api}"\n')
    env = {k: v for k, v in subprocess_env.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILES_PATH")}
    result = ragbatch("ingest", str(corpus), "--collection", "x", env={**env, "HOME": str(home)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.startswith(f"ragbatch: error: cannot reach the Prefect API at {api} (PREFECT_API_URL): "), result.stderr


def test_a_server_that_ends_on_its_own_is_one_line_and_one_stopped_is_not(tmp_path):
    """`serve` runs vLLM's server in the foreground: a server failing at start-up (after its own log)
    ended the command with that log alone; stopped with SIGTERM, the command ends without an error."""
    from tasks.serving import ServerExited, run_in_foreground

    with pytest.raises(ServerExited, match=r"^the vLLM server exited with code 3; its log above says why$"):
        run_in_foreground([sys.executable, "-c", "raise SystemExit(3)"], os.environ)
    handlers = [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)]
    ready = tmp_path / "ready"

    def stop_once_started() -> None:  # SIGTERM to this process once the server runs (never if it does not)
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if ready.exists():
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_started, daemon=True).start()
    server = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    # Its supervisor stops the server's group with SIGINT first, as Ctrl-C would.
    assert run_in_foreground([sys.executable, "-c", server], os.environ) == 128 + signal.SIGINT
    assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)] == handlers  # this process's own handling is back


def test_a_server_stopped_while_it_starts_is_stopped_once_it_runs(monkeypatch):
    """SIGTERM between the handlers' installation and the server's start was noted, and the server then
    ran on: it is sent on as soon as the server process exists."""
    import tasks.serving
    from tasks.serving import run_in_foreground

    start = subprocess.Popen

    def stopped_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return start(*args, **kwargs)

    monkeypatch.setattr(tasks.serving.subprocess, "Popen", stopped_first)
    began = time.monotonic()
    run_in_foreground([sys.executable, "-c", "import time; time.sleep(60)"], os.environ)
    assert time.monotonic() - began < 30


def test_verbose_goes_before_or_after_the_command():
    """README writes `-v` after the command, where only the top-level parser took it: exit 2."""
    parser = build_parser()
    for argv, verbose in ((["ingest", "docs"], False), (["-v", "ingest", "docs"], True), (["ingest", "docs", "-v"], True),
                          (["answer", "q.jsonl", "--verbose"], True), (["evaluate", "--dataset", "q.jsonl"], False),
                          (["serve", "-v"], True), (["server", "-v"], True), (["models", "prepare", "-v"], True)):
        assert parser.parse_args(argv).verbose is verbose, argv


@pytest.mark.parametrize("verbose", [False, True])
def test_the_terminal_shows_warnings_of_the_run_not_of_the_machinery_unless_verbose(monkeypatch, verbose):
    """vLLM's engine set-up (about forty lines) and Prefect's senders noting "Still processing items" as
    a failed command shuts down (in some runs, so no subprocess test catches it reliably) buried the
    command's one line. A level the user set for vLLM is kept. (conftest restores what this changes.)"""
    import logging
    import warnings

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import QUIET_LOGGERS, _configure_console

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")
    console = PrefectConsoleHandler()
    logging.getLogger("prefect").addHandler(console)
    try:
        with warnings.catch_warnings():
            _configure_console(verbose)
    finally:
        logging.getLogger("prefect").removeHandler(console)
    # Prefect's own run and task lines (INFO) stay off the terminal; its repeat of a failure never shows.
    assert (console.level == logging.WARNING) is not verbose
    failed, other = (logging.LogRecord("prefect.task_runs", logging.ERROR, "", 0, message, None, None)
                     for message in ("Finished in state Failed('no such file')", "other"))
    assert not console.filter(failed) and console.filter(other)
    with warnings.catch_warnings():
        _configure_console(verbose)
        filtered = any(action == "ignore" and category is FutureWarning and module and module.match("vllm.triton_utils")
                       for action, _, category, module, _ in warnings.filters)
    assert filtered is not verbose
    for name in [*QUIET_LOGGERS, "vllm.triton_utils.importing"]:
        assert logging.getLogger(name).isEnabledFor(logging.WARNING) is verbose, name
        assert logging.getLogger(name).isEnabledFor(logging.ERROR), name
    assert os.environ.get("VLLM_LOGGING_LEVEL") == (None if verbose else "ERROR")
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "INFO"
    assert {"EventsWorker", "APILogWorker", "vllm"} <= set(QUIET_LOGGERS)


def test_a_progress_bar_asked_for_is_kept_and_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    """--show-progress or RAGBATCH_SHOW_PROGRESS holds where stderr is no terminal (a CI log); without
    either the bar follows the terminal. Ctrl-C ends a command with 130, as a shell expects."""
    import contextlib

    import flows.ingest

    shown = []

    def interrupted(params):
        shown.append(params.show_progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(flows.ingest, "ingest", interrupted)  # ragbatch's own flow; the CLI around it is real
    monkeypatch.setattr("flows.cli._prefect_api", contextlib.nullcontext)
    monkeypatch.delenv("RAGBATCH_SHOW_PROGRESS", raising=False)
    ingest = ["ingest", str(tmp_path), "--data-dir", str(tmp_path / "state")]
    for flags, variable in ((["--show-progress"], None), ([], "true"), ([], None), (["--no-show-progress"], None)):
        with monkeypatch.context() as scope:
            if variable:
                scope.setenv("RAGBATCH_SHOW_PROGRESS", variable)
            assert main([*ingest, *flags]) == 130
        assert capsys.readouterr().err.splitlines()[-1] == "ragbatch: interrupted"
    assert shown == [True, True, False, False]  # pytest's stderr is no terminal
    assert build_parser().parse_args([*ingest, "--no-show-progress"]).show_progress is False


@pytest.mark.parametrize("quarantined", [0, 2])
def test_answer_names_its_quarantine_file_when_it_put_questions_there(capsys, quarantined):
    from flows.cli import _print_answer

    _print_answer({"questions": 5, "answered": 5 - quarantined, "failed": 0, "quarantined": quarantined, "resumed": 0,
                   "prompts_per_s": 1.0, "output_tokens_per_s": 9.0, "seconds": 3.0, "output": "/x/a.parquet",
                   "quarantine_path": "/x/runs/kb/r/questions-quarantine.parquet"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "answers: /x/a.parquet"
    assert lines[2:] == (["quarantined questions: /x/runs/kb/r/questions-quarantine.parquet"] if quarantined else [])


def test_a_data_dir_that_cannot_be_created_is_one_line_before_anything_starts(tmp_path, corpus, subprocess_env):
    """RAGBATCH_DATA_DIR is read when the package loads, to put Prefect's home there: a file in its path
    must not end the command there with a traceback (or Prefect's warning) instead."""
    (tmp_path / "t.csv").write_text("id,text\n")
    env = {name: value for name, value in subprocess_env.items() if name != "PREFECT_HOME"}
    env["RAGBATCH_DATA_DIR"] = str(tmp_path / "t.csv" / "state")
    result = ragbatch("ingest", str(corpus), "--collection", "x", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"ragbatch: error: cannot use {tmp_path}/t.csv/state as the data directory: {tmp_path}/t.csv "
                                     "is not a directory; set --data-dir or RAGBATCH_DATA_DIR to a directory you can write")


def is_engine(process: psutil.Process) -> bool:
    try:
        return process.name().startswith("VLLM::EngineCor")
    except psutil.Error:  # ended between listing and reading (vLLM's short-lived helper processes)
        return False


def test_serve_takes_its_llm_server_along_when_stopped_or_killed(tiny_llm_dir, tmp_path):
    """`ragbatch serve` runs vLLM's server (and its engine process) as children; stopped by a supervisor's
    SIGTERM the server outlived it, still answering on the port with the model loaded. One `serve` is
    stopped, one killed; they start side by side (each spends half a minute importing on one core)."""
    from tasks.child_process import free_port

    servers = {}
    for how in (signal.SIGTERM, signal.SIGKILL):
        env = {**os.environ, "RAGBATCH_DATA_DIR": str(tmp_path / how.name)}
        servers[how] = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--llm-model", str(tiny_llm_dir),
                                         "--port", str(free_port()), "--max-model-len", "1024", "--kv-cache-gib", "1"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        for how, command in servers.items():
            while not any(is_engine(child) for child in psutil.Process(command.pid).children(recursive=True)):
                assert command.poll() is None and time.monotonic() < deadline, f"{how.name}: the server's engine never started"
                time.sleep(0.2)
        for how, command in servers.items():
            descendants = psutil.Process(command.pid).children(recursive=True)
            command.send_signal(how)
            command.wait(timeout=120)
            assert_all_end(descendants, timeout=60, after=f"`ragbatch serve` ended by {how.name}")
    finally:
        for command in servers.values():
            if command.poll() is None:
                command.terminate()
                command.wait(timeout=120)
