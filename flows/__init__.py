"""ragbatch's Prefect flows and the `ragbatch` command line.

Importing the package sets the environment defaults below. Each flow module imports it first, since
a worker of a Prefect server loads a deployment's flow file as a script of its own, not as part of
this package; without that, runs on a worker started with plain `prefect worker start` went online
and sent telemetry.
"""

import os
import sys
import warnings
from pathlib import Path

_SET_HERE: set[str] = set()  # variables this module set (the user's own are never changed)
_CREATED_HERE: list[Path] = []  # directories it created for the data directory's Prefect home, deepest first


def _set(name: str, value: str) -> None:
    if name not in os.environ or name in _SET_HERE:
        os.environ[name] = value
        _SET_HERE.add(name)


def remove_unused_home() -> None:
    """Remove the directories made for the Prefect home if nothing was put there since: a command that
    ended before it ran (`--help`, a refused flag) left ./.ragbatch/prefect in the working directory."""
    for created in _CREATED_HERE:
        try:
            created.rmdir()
        except OSError:
            break
    _CREATED_HERE.clear()


def use_data_dir(data_dir: Path) -> None:
    """Keep Prefect's home (its database, logs, results and memo) and torch's compile cache in `data_dir`,
    where the user has not placed them. On import for RAGBATCH_DATA_DIR (or ./.ragbatch); the command
    line calls it again for --data-dir, before Prefect loads and reads them."""
    data_dir = Path(data_dir).absolute()
    remove_unused_home()  # the previous data directory's
    if "PREFECT_HOME" not in os.environ or "PREFECT_HOME" in _SET_HERE:
        # Prefect reads its profiles from its home: keep reading the user's (`prefect config set
        # PREFECT_API_URL=...`, `prefect profile use`), or a team server set that way was ignored.
        profiles = Path.home() / ".prefect" / "profiles.toml"
        if "PREFECT_PROFILES_PATH" not in os.environ and profiles.is_file():
            os.environ["PREFECT_PROFILES_PATH"] = str(profiles)
        _set("PREFECT_HOME", str(data_dir / "prefect"))
    home = Path(os.environ["PREFECT_HOME"]).expanduser()
    if "PREFECT_HOME" in _SET_HERE:
        try:
            _CREATED_HERE.extend(path for path in (home, *home.parents) if not path.exists())
            home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
        except OSError:  # the command refuses this data directory in one line (tasks.disk.prepare_data_dir)
            warnings.filterwarnings("ignore", "Failed to create the Prefect home directory")
    # Prefect 3.7 puts these two under ~/.prefect whatever PREFECT_HOME says (their defaults look for the
    # home in the wrong settings group): a failed task's pickled exception, and a server's block-registration memo.
    _set("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home / "storage"))
    _set("PREFECT_SERVER_MEMO_STORE_PATH", str(home / "memo_store.toml"))
    # torch creates its compile cache when transformers loads, in /tmp unless told (tasks.llm.vllm_environment's path).
    _set("TORCHINDUCTOR_CACHE_DIR", str(data_dir / "cache" / "torchinductor"))
    if "prefect.context" in sys.modules:
        # A worker's flow-run process (`python -m prefect.engine`) loaded Prefect, and read its settings,
        # before the flow file imported this package: without a refresh a failed task's pickled
        # exception still went to ~/.prefect/storage.
        sys.modules["prefect.context"].refresh_global_settings_context()


# Offline, no telemetry, state under the data directory: set before Prefect, torch or Hugging Face load.
use_data_dir(Path(os.environ.get("RAGBATCH_DATA_DIR", ".ragbatch")))
for _name, _value in {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The temporary server of a run without PREFECT_API_URL migrates a fresh database first: on a
    # busy 2-core machine that can exceed Prefect's 20 s default.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
