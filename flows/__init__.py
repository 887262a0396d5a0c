"""ragbatch's Prefect flows and the `ragbatch` command line."""

import os
import warnings
from pathlib import Path

# Offline, no telemetry, state under the data directory: set before Prefect, torch or Hugging Face load.
_data_dir = Path(os.environ.get("RAGBATCH_DATA_DIR", ".ragbatch")).absolute()
if "PREFECT_HOME" not in os.environ:
    try:
        (_data_dir / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
    except OSError:  # the command refuses this data directory in one line (tasks.disk.prepare_data_dir)
        warnings.filterwarnings("ignore", "Failed to create the Prefect home directory")
    os.environ["PREFECT_HOME"] = str(_data_dir / "prefect")
# torch creates its compile cache when transformers loads, in /tmp unless told (tasks.llm.cpu_environment's path).
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
