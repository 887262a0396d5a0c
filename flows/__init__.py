"""ragbatch's Prefect flows and the `ragbatch` command line.

Importing the package sets the environment defaults below. Each flow module imports it first, since
a worker of a Prefect server loads a deployment's flow file as a script of its own, not as part of
this package; without that, runs on a worker started with plain `prefect worker start` went online
and sent telemetry.
"""

import os
import warnings
from pathlib import Path

# Offline, no telemetry, state under the data directory: set before Prefect, torch or Hugging Face load.
_data_dir = Path(os.environ.get("RAGBATCH_DATA_DIR", ".ragbatch")).absolute()
if "PREFECT_HOME" not in os.environ:
    # Prefect reads its profiles from its home: keep reading the user's (`prefect config set
    # PREFECT_API_URL=...`, `prefect profile use`), or a team server set that way was ignored.
    _profiles = Path.home() / ".prefect" / "profiles.toml"
    if "PREFECT_PROFILES_PATH" not in os.environ and _profiles.is_file():
        os.environ["PREFECT_PROFILES_PATH"] = str(_profiles)
    try:
        (_data_dir / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
    except OSError:  # the command refuses this data directory in one line (tasks.disk.prepare_data_dir)
        warnings.filterwarnings("ignore", "Failed to create the Prefect home directory")
    os.environ["PREFECT_HOME"] = str(_data_dir / "prefect")
# Prefect 3.7 puts these two under ~/.prefect whatever PREFECT_HOME says (their defaults look for the home
# in the wrong settings group): a failed task's pickled exception, and a server's block-registration memo.
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(os.environ["PREFECT_HOME"]).expanduser() / "storage"))
os.environ.setdefault("PREFECT_SERVER_MEMO_STORE_PATH", str(Path(os.environ["PREFECT_HOME"]).expanduser() / "memo_store.toml"))
# torch creates its compile cache when transformers loads, in /tmp unless told (tasks.llm.vllm_environment's path).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_data_dir / "cache" / "torchinductor"))
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
