"""`ragbatch` command line: the flows as plain commands, flags generated from the same parameter models."""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import sys
import warnings
from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined
from pydantic_settings import SettingsError

from flows import remove_unused_home, use_data_dir  # (importing `flows` sets the environment defaults before Prefect loads)
from tasks.disk import MIN_FREE_BYTES, prepare_data_dir, require_free_space
from tasks.errors import RagbatchError
from tasks.settings import AnswerParams, EvaluateParams, IngestParams, PrefectServerParams, RagbatchSettings, ServeParams


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional: tuple[str, ...] = ()) -> None:
    """One option per model field (`chunk_tokens` -> `--chunk-tokens`), help text from its description."""
    for name, field in model.model_fields.items():
        help_text = field.description or ""
        if name in positional:
            parser.add_argument(name, help=help_text)
            continue
        flag = (field.json_schema_extra or {}).get("flag") or "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if getattr(field.annotation, "__origin__", None) is list:
            parser.add_argument(flag, dest=name, action="append", default=None, metavar=name.upper(), help=help_text)
            continue
        choices = list(get_args(field.annotation)) if get_origin(field.annotation) is Literal else None
        enum_type = next((t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, Enum)), None)
        if enum_type is not None:
            choices = [member.value for member in enum_type]
        default = field.get_default(call_default_factory=False)
        shown = "" if default in (None, "", PydanticUndefined) else f" (default: {default.value if isinstance(default, Enum) else default})"
        parser.add_argument(flag, dest=name, default=None, choices=choices, metavar=None if choices else name.upper(),
                            help=help_text + shown)


class InvalidParameters(Exception):
    """A flag or RAGBATCH_* variable the parameter model refuses; the message names which, in one line."""


def params_from_args(model: type[BaseModel], args: argparse.Namespace) -> Any:
    """Build the parameter model from the flags that were given; the rest come from env or defaults."""
    given = {name: value for name, value in vars(args).items() if name in model.model_fields and value is not None}
    try:
        return model(**given)
    except ValidationError as exc:
        raise InvalidParameters(_one_line(exc, model, given)) from None
    except SettingsError as exc:  # a list variable that is not JSON, read before the flags are applied
        field = re.search(r'field "(\w+)"', str(exc))
        variable = f"RAGBATCH_{field.group(1).upper()}" if field else "a RAGBATCH_* variable"
        raise InvalidParameters(f"invalid {variable}: a list is written as JSON in the environment, "
                                f"such as {variable}='[\"one\", \"two\"]'") from None


def _command_params(model: type[RagbatchSettings], args: argparse.Namespace, command: str) -> Any:
    """The command's parameters, once its data directory has room and exists: Prefect's database and the
    embedded store live there, and on a full disk Prefect's server never starts (a traceback after two
    minutes) and the store dies of SIGBUS."""
    params = params_from_args(model, args)
    require_free_space(params.data_dir, MIN_FREE_BYTES, command)
    prepare_data_dir(params.data_dir)
    use_data_dir(params.data_dir)  # for --data-dir: importing `flows` chose RAGBATCH_DATA_DIR's, or ./.ragbatch
    return params


def _one_line(error: ValidationError, model: type[BaseModel], given: dict[str, Any]) -> str:
    """The first problem, named as the user set it: its flag, or its RAGBATCH_* variable when that and
    not a flag gave the value; a problem of the parameters together (a model validator's) as it is."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ") + (f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else "")
    if not first["loc"]:
        return message
    name = str(first["loc"][0])
    variable = f"RAGBATCH_{name.upper()}"
    if name not in given and any(key.upper() == variable for key in os.environ):
        return f"invalid {variable}: {message}"
    field = model.model_fields.get(name)
    flag = (field and (field.json_schema_extra or {}).get("flag")) or "--" + name.replace("_", "-")
    return f"invalid {flag}: {message}"


def _is_file_error(exc: BaseException) -> bool:
    """A file-system error naming its file (no space, no permission, not a directory): one line says it all."""
    return isinstance(exc, OSError) and bool(exc.filename)


class _DropKnownErrors(logging.Filter):
    """The CLI prints RagbatchErrors and file errors itself as one line; drop Prefect's copy with its
    traceback, and the failed task's "Finished in state Failed(...)" that repeats the error (a traceback
    for any other error still comes with the exception's own record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            return not (isinstance(record.exc_info[1], RagbatchError) or _is_file_error(record.exc_info[1]))
        return not str(record.msg).startswith("Finished in state Failed")


# What a command without --verbose keeps to errors: vLLM and torch (read when first imported, and passed on
# to engine and cluster worker processes); vLLM's logger itself for what it logs while importing, before
# its own set-up; Prefect's event and log senders, which note their draining at exit as a warning.
QUIET_ENVIRONMENT = {"VLLM_LOGGING_LEVEL": "ERROR", "TORCH_CPP_LOG_LEVEL": "ERROR"}
QUIET_LOGGERS = ("vllm", "EventsWorker", "APILogWorker")


def _configure_console(verbose: bool) -> None:
    """Terminal output: Prefect's warnings and vLLM's errors only unless --verbose; the API still receives
    every Prefect log line. vLLM's engine otherwise prints about forty lines of set-up (its platform
    warnings on CPU among them) that bury the command's result. A level the user set for vLLM is kept."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_DropKnownErrors())
                if not verbose:
                    handler.setLevel(logging.WARNING)
    if not verbose:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")


def _flow_command(model: type[RagbatchSettings], flow_name: str):
    """A subcommand that builds the flow's parameters from the flags and runs the flow in-process."""

    def run(args: argparse.Namespace) -> dict[str, Any]:
        params = _command_params(model, args, flow_name)
        if "show_progress" not in params.model_fields_set:  # neither the flag nor RAGBATCH_SHOW_PROGRESS
            params.show_progress = sys.stderr.isatty()
        flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
        _configure_console(args.verbose)
        with _prefect_api():
            return flow(params).model_dump()

    return run


def _prefect_api() -> AbstractContextManager[Any]:
    """The configured Prefect API, or else a temporary server of this command's own that dies with it."""
    from prefect.settings import get_current_settings

    from tasks.prefect_server import require_reachable_api, temporary_server

    settings = get_current_settings()
    if not settings.api.url:
        return temporary_server(settings.home)
    require_reachable_api(settings.api.url)
    return nullcontext()


def _print_answer(result: dict[str, Any]) -> None:
    print(
        f"{result['questions']} questions: {result['answered']} answered, {result['failed']} failed, "
        f"{result['quarantined']} quarantined, {result['resumed']} already done; "
        f"{result['prompts_per_s']} prompts/s, {result['output_tokens_per_s']} output tokens/s ({result['seconds']:.1f} s)"
    )
    print(f"answers: {result['output']}")
    if result["quarantined"]:
        print(f"quarantined questions: {result['quarantine_path']}")


def _print_evaluate(result: dict[str, Any]) -> None:
    mode = result["retrieval"] + (f" ({result['fusion']})" if result.get("fusion") else "")
    if result["queries"]:
        measures = (f"{result['queries']} queries: nDCG@10 {result['ndcg@10']:.4f}, recall@10 {result['recall@10']:.4f}, "
                    f"recall@100 {result['recall@100']:.4f}, MRR@10 {result['mrr@10']:.4f}")
    else:
        measures = "no query has relevance judgements"
    print(f"{result['collection']}, {mode} retrieval, {measures} ({result['seconds']:.1f} s)")
    if result.get("relevant_not_indexed"):
        print(f"relevant documents not in {result['collection']}: {result['relevant_not_indexed']} (each scored as a miss)")
    if result.get("answers") is not None:
        shares = ", ".join(f"{name} {result[name]:.4f}" for name in
                           ("exact_match", "token_f1", "answers_citing", "citations_valid", "cited_relevant")
                           if result.get(name) is not None)
        print(f"{result['answers']} answers: {shares}")
    print(f"per query: {result['per_query_path']}; summary: {result['summary_path']}")
    if result["quarantined"]:
        print(f"quarantined questions: {result['quarantined']} of {result['questions']}, in {result['quarantine_path']}")


def _run_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Run vLLM's OpenAI-compatible server in the foreground until Ctrl-C or SIGTERM, which stop it
    and its engine process; a supervisor process does that also when this one is killed outright."""
    from tasks.child_process import http_address, require_free_port
    from tasks.llm import has_cuda, vllm_environment
    from tasks.llm_models import resolve_llm_model
    from tasks.serving import run_in_foreground, server_key_environment, vllm_server_command

    params = _command_params(ServeParams, args, "serve")
    key_environment = server_key_environment(params.host, os.environ)
    require_free_port(params.host, params.port)
    model_dir = resolve_llm_model(params.llm_model, params.data_dir / "models")
    cuda = has_cuda()
    command = vllm_server_command(
        model_dir=model_dir, served_name=params.llm_model, host=params.host, port=params.port,
        max_model_len=params.max_model_len, dtype=params.dtype, enforce_eager=params.enforce_eager,
        kv_cache_gib=params.kv_cache_gib, gpu_memory_utilization=params.gpu_memory_utilization,
        tensor_parallel_size=params.tensor_parallel_size,
        data_parallel_size=params.data_parallel_size, cuda=cuda, require_key=bool(key_environment),
    )
    url = f"{http_address(params.host, params.port)}/v1"
    print(f"serving {params.llm_model} at {url} (Ctrl-C to stop)", file=sys.stderr)
    scratch = params.data_dir / "cache" / "tmp"  # vLLM's engine leaves a file store of its process group there
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **vllm_environment(params.data_dir / "cache", cuda=cuda, kv_cache_gib=params.kv_cache_gib),
           **key_environment, "TMPDIR": str(scratch)}
    code = run_in_foreground(command, env)
    return {"exit_code": code, "model": params.llm_model, "url": url}


def _run_server(args: argparse.Namespace) -> dict[str, Any]:
    """Start the local Prefect stack, print the UI address, and stop it all on Ctrl-C or SIGTERM."""
    import signal

    from tasks.prefect_server import PrefectServerError, PrefectStack

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    params = _command_params(PrefectServerParams, args, "server")
    stack = PrefectStack(params)
    print(f"starting Prefect on {stack.ui_url} (state and logs in {stack.home})", file=sys.stderr)
    stack.start()
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # also when started in the background, where SIGINT is ignored
    print(f"Prefect UI: {stack.ui_url}  (work pools: {', '.join(stack.pools)}; Ctrl-C stops server and workers)", flush=True)
    try:
        exited = stack.wait()
    except KeyboardInterrupt:
        print("stopping worker and server", file=sys.stderr)
        stack.stop()
        return {"exit_code": 0, "ui": stack.ui_url}
    stack.stop()
    raise PrefectServerError(f"the Prefect {exited.name} exited (code {exited.process.returncode}); see {stack.log_dir / (exited.name + '.log')}")


def _run_models_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.llm_models import DEFAULT_LLM, prepare_smollm2

    params = _command_params(RagbatchSettings, args, "models prepare")
    return {"model": DEFAULT_LLM, "path": str(prepare_smollm2(params.data_dir / "models"))}


def _print_ingest(result: dict[str, Any]) -> None:
    print(
        f"{result['collection']}: {result['loaded']} rows loaded, {result['valid']} valid, "
        f"{result['quarantined']} quarantined; {result['unchanged']} documents unchanged; "
        f"{result['embedded']} chunks embedded, {result['upserted']} points written, {result['deleted']} deleted; "
        f"{result['points']} points in {result['physical_collection']} ({result['seconds']:.1f} s)"
    )
    if result["quarantined"]:
        print(f"quarantined rows: {result['quarantine_path']}")
    if result["unidentified"]:
        print(f"deleted nothing as missing: {result['unidentified']} quarantined rows have no readable id")


def build_parser() -> argparse.ArgumentParser:
    verbose_help = "Show Prefect's run and task logs and vLLM's engine logs on the terminal (`serve` always shows its server's log)."
    parser = argparse.ArgumentParser(prog="ragbatch", description="Batch RAG: index documents into Qdrant and run question sets.")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # Also after the command (`ragbatch ingest docs -v`); absent there, it leaves the value given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    commands = parser.add_subparsers(dest="command", required=True)
    ingest = commands.add_parser("ingest", parents=[verbose], help="Index a document source into a Qdrant collection (incremental).")
    add_model_options(ingest, IngestParams, positional=("source",))
    ingest.add_argument("--json", action="store_true", help="End stdout with one JSON object of counts.")
    ingest.set_defaults(run=_flow_command(IngestParams, "ingest"), show=_print_ingest)

    answer = commands.add_parser("answer", parents=[verbose], help="Answer a question set with retrieval and a local LLM, into Parquet.")
    add_model_options(answer, AnswerParams, positional=("questions",))
    answer.add_argument("--json", action="store_true", help="End stdout with one JSON object of counts.")
    answer.set_defaults(run=_flow_command(AnswerParams, "answer"), show=_print_answer)

    evaluate = commands.add_parser("evaluate", parents=[verbose], help="Measure retrieval and answer quality on a BEIR dataset or question set.")
    add_model_options(evaluate, EvaluateParams)
    evaluate.add_argument("--json", action="store_true", help="End stdout with one JSON object of the metrics.")
    evaluate.set_defaults(run=_flow_command(EvaluateParams, "evaluate"), show=_print_evaluate)

    serve = commands.add_parser("serve", parents=[verbose], help="Serve the LLM as an OpenAI-compatible API on loopback (vLLM).")
    add_model_options(serve, ServeParams)
    serve.set_defaults(run=_run_serve, show=lambda result: None, json=False)

    server = commands.add_parser("server", parents=[verbose], help="Start a local Prefect server and UI with the deployments and a worker.")
    add_model_options(server, PrefectServerParams)
    server.set_defaults(run=_run_server, show=lambda result: None, json=False)

    models = commands.add_parser("models", parents=[verbose], help="Manage local model files.")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = models_commands.add_parser("prepare", parents=[verbose], help="Convert the bundled SmolLM2 into a model directory (offline).")
    add_model_options(prepare, RagbatchSettings)
    prepare.set_defaults(run=_run_models_prepare, show=lambda result: print(result["path"]), json=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        remove_unused_home()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except RagbatchError as exc:
        print(f"ragbatch: error: {exc}", file=sys.stderr)
        return 1
    except InvalidParameters as exc:
        print(f"ragbatch: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _is_file_error(exc):  # a socket, say: keep the traceback
            raise
        problem = exc.strerror
        if isinstance(exc, FileExistsError) and os.path.isfile(exc.filename):  # what mkdir says of a file in the way
            problem = "a file, where a directory is needed"
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            problem += "; free some space and run again"
        print(f"ragbatch: error: {exc.filename}: {problem}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ragbatch: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    else:
        args.show(result)
    return int(result.get("exit_code", 0))


if __name__ == "__main__":
    sys.exit(main())
