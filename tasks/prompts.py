"""Prompts: a template filled with numbered passages, the model's chat template, fitted to its context."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.errors import RagbatchError
from tasks.retrieval import Hit

DEFAULT_TEMPLATE = """Answer the question using only the numbered context passages below. \
Cite the passages you use like [1]. If the passages do not contain the answer, \
say that the context does not contain the answer.

Context:
{context}

Question: {question}"""

# A passage number; longer digit runs are no citation (and overflow int32).
_CITATION = re.compile(r"\[(\d{1,9})\]")
# Several passage numbers ("[1, 2]", "[1-3]"): a citation when each is one a prompt can give (an
# interval "[0, 1]" or years "[2019-2021]" are none).
_CITATION_LIST = re.compile(r"\[(\d{1,3}(?:\s*(?:[,;]|[-\u2013])\s*\d{1,3})+)\]")
_CITED = re.compile(r"(\d+)(?:\s*[-\u2013]\s*(\d+))?")
MAX_PASSAGES = 100  # the most passages a prompt gives (AnswerParams.top_k)
# A bracketed number standing alone in a passage's text: a reference marker "[3]", or one opening a
# line as the passages' own numbers do; not an index such as arr[1].
_MARKER_IN_PASSAGE = re.compile(r"(?<![\w\]])\[(\d{1,9})\]")


_PLACEHOLDER = re.compile(r"\{context\}|\{question\}")


class PromptTooLong(ValueError):
    """Not even the best passage fits beside the question with room for the answer."""


@dataclass(frozen=True)
class Prompt:
    """The final text given to the model, its token count, and which passages made it in."""

    text: str
    tokens: int
    passages: list[Hit]
    dropped: int


def load_template(path: Path | None) -> str:
    """The default template, or a user's file that must contain {context} and {question}."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        template = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RagbatchError(f"{path}: cannot read prompt template ({exc.strerror or exc})") from None
    missing = [name for name in ("{context}", "{question}") if name not in template]
    if missing:
        raise RagbatchError(f"{path}: prompt template lacks {' and '.join(missing)}")
    return template


def format_passages(hits: Sequence[Hit]) -> str:
    """The passages numbered [1], [2], ... A bracketed number standing alone in a passage's own text or
    title becomes (n), and a title one line: a text holding "\n\n[2] ..." passed for a passage of its
    own, and the model's [2] was counted as citing the retrieved second passage."""
    def own(text: str) -> str:
        return _MARKER_IN_PASSAGE.sub(r"(\1)", text)

    return "\n\n".join(f"[{i}] {' '.join(own(hit.title).split())}\n{own(hit.text)}" if hit.title else f"[{i}] {own(hit.text)}"
                         for i, hit in enumerate(hits, 1))


def _citation_groups(answer: str) -> list[tuple[re.Match, list[int]]]:
    """Each citation of an answer, in order, with the passage numbers it cites."""
    groups = [(match, [int(match.group(1))]) for match in _CITATION.finditer(answer)]
    for match in _CITATION_LIST.finditer(answer):
        numbers = []
        for first, last in _CITED.findall(match.group(1)):
            numbers += range(int(first), int(last or first) + 1) if int(first) <= int(last or first) else [-1]
        if numbers and all(1 <= number <= MAX_PASSAGES for number in numbers):
            groups.append((match, numbers))
    return sorted(groups, key=lambda group: group[0].start())


def find_citations(answer: str) -> list[int]:
    """Passage numbers cited in an answer as [n], [n, m] or [n-m], first mention first."""
    return list(dict.fromkeys(number for _, numbers in _citation_groups(answer) for number in numbers))


def without_citations(text: str) -> str:
    """The text with its citations blanked out (they are no part of an answer's words)."""
    for match, _ in reversed(_citation_groups(text)):
        text = text[:match.start()] + " " + text[match.end():]
    return text


class ChatFormat(Protocol):
    """How a user message becomes the model's input text, and that text's length in the model's tokens.

    `concurrency` is how many prompts may be built at once: 1 for a local tokenizer, more for a server
    whose round trips overlap.
    """

    concurrency: int

    def render(self, content: str) -> str: ...

    def count(self, text: str) -> int: ...


class TokenizerChat:
    """A local transformers tokenizer: its chat template (the plain message when it has none) and token counts."""

    concurrency = 1

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._added_prefix = tokenizer.decode(tokenizer("")["input_ids"])  # what encoding puts first: a BOS, or nothing

    def render(self, content: str) -> str:
        """The template's text, less the BOS it writes when encoding adds one too (Llama 3, Mistral, Gemma):
        the engine and `/v1/completions` encode the text with the BOS added, and the model saw it twice."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            return text.removeprefix(self._added_prefix) if self._added_prefix else text
        return content

    def count(self, text: str) -> int:
        """Tokens as the engine will see them (the engine tokenizes the text the same way)."""
        return len(self.tokenizer(text)["input_ids"])


class PromptBuilder:
    """Builds prompts that fit `max_model_len` with `max_tokens` left for the answer, dropping the lowest-ranked passages first."""

    def __init__(self, *, chat: ChatFormat, template: str, max_model_len: int, max_tokens: int) -> None:
        self.chat = chat
        self.template = template
        self.budget = max_model_len - max_tokens

    def render(self, question: str, hits: Sequence[Hit]) -> str:
        """The template with both placeholders filled in one pass: a passage or question that contains
        `{question}` or `{context}` keeps it as written."""
        values = {"{context}": format_passages(hits), "{question}": question}
        return self.chat.render(_PLACEHOLDER.sub(lambda match: values[match.group()], self.template))

    def build(self, question: str, hits: Sequence[Hit]) -> Prompt:
        """The prompt with as many top-ranked passages as fit; at least one when any was retrieved."""
        kept = list(hits)
        while True:
            text = self.render(question, kept)
            tokens = self.chat.count(text)
            if tokens <= self.budget:
                return Prompt(text, tokens, kept, len(hits) - len(kept))
            if len(kept) <= 1:
                what = "with one passage" if kept else "without passages"
                raise PromptTooLong(
                    f"prompt does not fit {what}: {tokens} tokens, the model allows {self.budget} before the answer"
                )
            kept.pop()
