"""prefect.yaml stays deployable: every entrypoint imports and every parameter default validates."""

import importlib.util

import pytest
import yaml

from .conftest import ROOT

DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


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
        source = getattr(value, "source", None)
        if source is not None:
            assert (ROOT / source).exists(), f"{deployment['name']}: {source} does not exist"
        dataset = getattr(value, "dataset", None)
        if dataset is not None:
            assert (ROOT / dataset).exists(), f"{deployment['name']}: {dataset} does not exist"
