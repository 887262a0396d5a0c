"""A random two-layer Llama with a small locally trained tokenizer: real vLLM in seconds, for tests."""

from __future__ import annotations

import itertools
from pathlib import Path

from tasks.llm_models import CHATML_TEMPLATE

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
    weights from a fixed seed. `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<s>` are ids 0, 1, 2, 3;
    `<|im_end|>` ends generation. Like Llama 3's, the tokenizer adds the BOS `<s>` to what it encodes
    and the chat template writes it too (SmolLM2, the end-to-end model, does neither).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=3, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
