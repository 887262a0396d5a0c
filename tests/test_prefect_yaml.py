"""prefect.yaml stays deployable: every entrypoint imports and every parameter default validates."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from .conftest import ROOT

DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
EXAMPLES = [(path.name, d) for path in sorted((ROOT / "deployments").glob("*.prefect.yaml"))
            for d in yaml.safe_load(path.read_text())["deployments"]]


def load_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"entry_{name}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_imports_and_parameters_validate(deployment):
    flow = load_flow(deployment["entrypoint"])
    parameters = flow.validate_parameters(deployment.get("parameters", {}))
    for value in parameters.values():
        for field in ("source", "questions", "dataset"):
            path = getattr(value, field, None)
            if path is not None:
                assert (ROOT / path).exists(), f"{deployment['name']}: {path} does not exist"


@pytest.mark.parametrize(("file", "deployment"), EXAMPLES, ids=lambda v: v if isinstance(v, str) else v["name"])
def test_per_environment_deployments_import_and_validate(file, deployment):
    """The example files in deployments/ point at paths of another machine: only their types are checked."""
    load_flow(deployment["entrypoint"]).validate_parameters(deployment["parameters"])


def test_the_expected_deployments_exist_on_one_process_pool():
    by_name = {d["name"]: d for d in DEPLOYMENTS}
    assert {"reindex", "rebuild", "answer", "evaluate"} <= set(by_name)
    assert by_name["reindex"]["schedules"][0]["cron"]
    assert by_name["rebuild"]["parameters"]["params"]["rebuild"] is True
    assert not any("schedules" in by_name[name] for name in ("rebuild", "answer", "evaluate"))
    assert {d["work_pool"]["name"] for d in DEPLOYMENTS} == {"ragbatch"}


@pytest.mark.parametrize(("entrypoint", "first"), [("flows/ingest.py:ingest", ["source", "collection", "rebuild"]),
                                                  ("flows/answer.py:answer", ["questions", "collection", "out"]),
                                                  ("flows/evaluate.py:evaluate", ["dataset", "collection", "retrieval"])])
def test_ui_form_starts_with_what_a_person_fills_in_and_describes_every_field(entrypoint, first):
    schema = parameter_schema(load_flow(entrypoint).fn).model_dump()
    (model,) = [d for d in schema["definitions"].values() if d.get("title", "").endswith("Params")]
    assert list(model["properties"])[: len(first)] == first
    assert list(model["properties"])[-1] == "data_dir"
    undocumented = [name for name, field in model["properties"].items() if not field.get("description")]
    assert not undocumented


OFFLINE_AND_NO_TELEMETRY = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                            "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.mark.parametrize("path", sorted({d["entrypoint"].split(":")[0] for d in DEPLOYMENTS}))
def test_a_worker_loading_a_flow_file_as_a_script_sets_the_environment_defaults(path, tmp_path):
    """A worker of a Prefect server loads `flows/ingest.py` as a module of its own, not as `flows.ingest`:
    the package's defaults (offline, no telemetry) applied only to the `ragbatch` command before. Its
    flow-run process has read Prefect's settings by then, so they are refreshed: a failed task's pickled
    exception went to ~/.prefect/storage, outside the data directory."""
    code = ("import json, os, sys; from prefect.settings import get_current_settings; "
            "from prefect.utilities.importtools import load_script_as_module; load_script_as_module(sys.argv[1]); "
            "settings = get_current_settings(); print(json.dumps([{k: os.environ.get(k) for k in sys.argv[2:]}, "
            "str(settings.results.local_storage_path), str(settings.server.memo_store_path)]))")
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_AND_NO_TELEMETRY and not k.startswith("PREFECT_")}
    env |= {"RAGBATCH_DATA_DIR": str(tmp_path), "HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", code, path, *OFFLINE_AND_NO_TELEMETRY], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    home = tmp_path / "prefect"
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [OFFLINE_AND_NO_TELEMETRY, str(home / "storage"),
                                                                 str(home / "memo_store.toml")]


def test_the_local_stack_takes_its_work_pools_from_prefect_yaml(tmp_path):
    """`ragbatch server --work-pool other` created that pool and its worker, while the deployments went
    to prefect.yaml's own pool: deploying failed, or the runs waited for a worker forever."""
    from tasks.prefect_server import PrefectServerError, work_pools

    assert work_pools(ROOT / "prefect.yaml") == ["ragbatch"]
    two = tmp_path / "prefect.yaml"
    two.write_text(yaml.safe_dump({"deployments": [{"name": "a", "work_pool": {"name": "cpu"}},
                                                   {"name": "b", "work_pool": {"name": "gpu"}},
                                                   {"name": "c", "work_pool": {"name": "cpu"}}]}))
    assert work_pools(two) == ["cpu", "gpu"]
    two.write_text(yaml.safe_dump({"deployments": [{"name": "a"}]}))
    with pytest.raises(PrefectServerError, match=rf"^{two}: every deployment needs a work_pool with a name"):
        work_pools(two)
    for nothing in ("deployments: []\n", "{}\n"):  # a stack without pools would start no worker
        two.write_text(nothing)
        with pytest.raises(PrefectServerError, match=rf"^{two}: no deployments$"):
            work_pools(two)
    with pytest.raises(PrefectServerError, match=rf"^no prefect.yaml in {tmp_path / 'elsewhere'}; run from the project"):
        work_pools(tmp_path / "elsewhere" / "prefect.yaml")
