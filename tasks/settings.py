"""Typed parameters shared by flows (Prefect UI forms), CLI flags and RAGBATCH_* environment variables."""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.store import is_server

DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MAX_QUESTION_CHARS = 4000  # answer and evaluate quarantine the same questions of one file


def _not_a_directory(path: Path | None) -> Path | None:
    """An output file's path: an existing directory there is named before the run, not by a write at its end."""
    if path is not None and path.is_dir():
        raise ValueError(f"{path} is a directory; name a Parquet file, e.g. {path / 'out.parquet'}")
    return path


OutputFile = Annotated[Path | None, AfterValidator(_not_a_directory)]

# A URL without user:password@: Prefect stores a run's parameters and shows them as plain text (and
# qdrant-client drops them from a server URL). Also the forms' JSON schema, so that the Prefect server
# refuses such a deployment run before storing its parameters.
NO_URL_CREDENTIALS = r"^(?![A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@)"


def _without_credentials(where_keys_go: str) -> AfterValidator:
    def check(url: str | None) -> str | None:
        if url and not re.match(NO_URL_CREDENTIALS, url):
            raise ValueError(f"the URL holds credentials (user:password@), which would be kept and shown as plain text with "
                             f"the run's parameters; leave them out and {where_keys_go}")
        return url

    return AfterValidator(check)


def replaced_file(out: Path) -> Path:
    """The file that writing the output `out` replaces, to compare with the resolved inputs: its
    directory followed through links and `..`, the name itself not (a write renames a whole file over
    it, so a link there is replaced, not written through)."""
    return out.parent.resolve() / out.name


class SourceFormat(str, Enum):
    """How to read a source; `auto` decides from the path."""

    auto = "auto"
    dir = "dir"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"
    beir = "beir"


class QuestionFormat(str, Enum):
    """How to read a question set, a file; `auto` decides from its suffix."""

    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"


class EmbeddingBackend(str, Enum):
    """What runs the embedding model; both give the same vectors."""

    sentence_transformers = "sentence-transformers"
    vllm = "vllm"


class TaskRunnerKind(str, Enum):
    """What runs the embed/upsert shards: threads in the flow's process, or Dask / Ray worker processes."""

    threads = "threads"
    dask = "dask"
    ray = "ray"


class RetrievalMode(str, Enum):
    """How passages are found: dense embeddings, BM25 sparse vectors, or both fused (all inside Qdrant)."""

    dense = "dense"
    sparse = "sparse"
    hybrid = "hybrid"


class FusionMethod(str, Enum):
    """How hybrid retrieval merges the dense and sparse rankings: reciprocal rank or distribution-based score fusion."""

    rrf = "rrf"
    dbsf = "dbsf"


# Reciprocal rank fusion's k (Cormack, Clarke & Buettcher 2009; Qdrant's own default is 2): a point
# scores 1 / (k + rank) per ranking that holds it.
RRF_K = 60


def highest_score(mode: RetrievalMode, fusion: FusionMethod) -> float | None:
    """The highest score a passage can have in this retrieval, or None where there is none: cosine 1;
    RRF 1 / k from each of two rankings (Qdrant counts ranks from 0); BM25 and DBSF (whose
    normalisation by mean and 3 standard deviations is not clipped) unbounded."""
    if mode == RetrievalMode.dense:
        return 1.0
    if mode == RetrievalMode.hybrid and fusion == FusionMethod.rrf:
        return 2 / RRF_K
    return None


def default_data_dir() -> Path:
    """Where ragbatch keeps its state unless told otherwise: `.ragbatch/` in the working directory."""
    return Path(os.environ.get("RAGBATCH_DATA_DIR", ".ragbatch")).absolute()


def _form_order(schema: dict, model: type[BaseModel]) -> None:
    """Order the JSON schema (and so the Prefect UI form): the model's `form_first` fields, then the
    fields of the most derived class first.

    Pydantic lists inherited fields first, which would open every form with the data directory.
    """
    declared = [*getattr(model, "form_first", ())]
    declared += [name for klass in model.__mro__ for name in vars(klass).get("__annotations__", {})]
    rank = {name: i for i, name in reversed(list(enumerate(declared)))}
    properties = schema.get("properties", {})
    schema["properties"] = dict(sorted(properties.items(), key=lambda item: rank.get(item[0], len(rank))))


class RagbatchSettings(BaseSettings):
    """Base of every parameter model: RAGBATCH_* environment variables, and the data directory."""

    model_config = SettingsConfigDict(
        env_prefix="RAGBATCH_", extra="forbid", use_enum_values=False, json_schema_extra=_form_order
    )

    # Absolute from the start: a relative one meant another directory to `ragbatch server`'s workers,
    # which run in the project directory, than to the command that started them.
    data_dir: Annotated[Path, AfterValidator(Path.absolute)] = Field(
        default_factory=default_data_dir,
        description="Directory for ragbatch's state: the embedded store, models, quarantine and run files.",
    )


class StoreParams(RagbatchSettings):
    """Where the index lives. The Qdrant API key is never a parameter: it comes from a Prefect Secret block
    named here, or from RAGBATCH_QDRANT_API_KEY."""

    collection: str = Field(
        "docs",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Collection name. ragbatch points this alias at a physical collection.",
    )
    store: Annotated[str, _without_credentials("give the API key in qdrant_api_key_block or RAGBATCH_QDRANT_API_KEY")] = Field(
        "",
        description="http(s)://host:port for a Qdrant server, edge:PATH for Qdrant's engine in-process (qdrant-edge), "
        "local:PATH for qdrant-client's local mode, or :memory:. Empty: edge under the data directory "
        "(or the local-mode store an earlier version created there).",
        json_schema_extra={"pattern": NO_URL_CREDENTIALS},
    )
    qdrant_api_key_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the Qdrant API key; default: RAGBATCH_QDRANT_API_KEY."
    )

    @model_validator(mode="after")
    def _default_store(self) -> "StoreParams":
        if not self.store:
            earlier = self.data_dir / "qdrant"
            self.store = f"local:{earlier}" if earlier.is_dir() else f"edge:{self.data_dir / 'edge'}"
        return self


class IngestParams(StoreParams):
    """Parameters of the ingest flow."""

    form_first: ClassVar[tuple[str, ...]] = ("source", "collection", "rebuild", "retrieval")

    source: Path = Field(description="A directory of .txt/.md/.html files, a JSONL/CSV/Parquet table, or a BEIR directory.")
    format: SourceFormat = Field(SourceFormat.auto, description="Source format; auto detects it from the path.")
    rebuild: bool = Field(False, description="Build a new collection and swap the alias to it when complete.")
    embedding_model: str = Field(
        DEFAULT_EMBEDDING_MODEL,
        description="sentence-transformers model: a bundled name, a local directory or a hub id.",
    )
    embedding_backend: EmbeddingBackend = Field(
        EmbeddingBackend.sentence_transformers,
        description="sentence-transformers, or vllm (its pooling runner: same vectors, 1.3-2.3x faster on CPU, "
        "20-30 s engine start; needs ragbatch[llm]).",
    )
    device: str | None = Field(None, description="Torch device for embedding; default CUDA when present, else CPU.")
    embedding_gpu_share: float | None = Field(
        None, gt=0, lt=1, description="GPU only, embedding_backend vllm: share of each GPU's memory for each embedding "
        "engine. Default: 0.9, split evenly among the workers of a local Dask/Ray cluster.",
    )
    chunk_tokens: int = Field(200, ge=16, le=8192, description="Chunk size in tokens of the embedding model.")
    chunk_overlap: int = Field(32, ge=0, description="Tokens shared by neighbouring chunks.")
    batch_docs: int = Field(256, ge=1, description="Documents per pipeline batch (bounds memory).")
    embed_batch_size: int = Field(64, ge=1, description="Texts per forward pass of the embedding model.")
    max_chars: int = Field(1_000_000, ge=1, description="Documents longer than this many characters are quarantined.")
    max_quarantined_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail the run (and delete nothing) when more of the input than this fails validation."
    )
    show_progress: bool = Field(False, description="Show a progress bar on the terminal.")
    retrieval: RetrievalMode | None = Field(
        None, description="Vectors to store: dense, sparse (BM25) or hybrid (both). Fixed when the collection is created; "
        "default: hybrid for a new collection or --rebuild, the collection's own otherwise.",
    )
    task_runner: TaskRunnerKind = Field(
        TaskRunnerKind.threads, description="Prefect task runner for the embed/upsert shards: threads in this process, "
        "dask (prefect-dask) or ray (prefect-ray, pip install 'ragbatch[ray]').",
    )
    shards: int = Field(1, ge=1, le=1024, description="Embed/upsert shards per batch, run in parallel: threads, or the "
                        "worker processes of a local Dask/Ray cluster.")
    cluster_address: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001) to run the shards on; "
        "empty: a local cluster on 127.0.0.1.",
    )
    shard_number: int | None = Field(None, ge=1, description="Qdrant server only: shards of a new collection, spread over the cluster's nodes.")
    replication_factor: int | None = Field(
        None, ge=1, description="Qdrant server only: copies of each shard of a new collection (on different nodes)."
    )

    @model_validator(mode="after")
    def _cluster_options_need_a_server(self) -> "IngestParams":
        if (self.shard_number or self.replication_factor) and not is_server(self.store):
            raise ValueError("shard_number and replication_factor apply to a Qdrant server (--store http://...), "
                             f"not to {self.store}")
        return self

    @field_validator("chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, overlap: int, info) -> int:
        size = info.data.get("chunk_tokens")
        if size is not None and overlap >= size:
            raise ValueError(f"chunk_overlap ({overlap}) must be smaller than chunk_tokens ({size})")
        return overlap


class EngineParams(RagbatchSettings):
    """The generation model and how vLLM runs it."""

    llm_model: str = Field("SmolLM2-135M-Instruct", description="Generation model: the bundled SmolLM2, a local directory or a hub id.")
    max_model_len: int | None = Field(None, ge=64, description="Context length for the engine; default: the model's.")
    dtype: Literal["auto", "bfloat16", "float16", "float32", "half", "float"] = Field("auto", description="Weights dtype for vLLM; auto: bfloat16 on CPUs with native bf16, else float32; the model's own on GPU.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (GPU only).")
    kv_cache_gib: float = Field(2.0, gt=0, description="KV-cache space in GiB on CPU.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, lt=1, description="Share of each GPU's memory for vLLM: weights, activations and KV cache (GPU only).",
    )
    enforce_eager: bool = Field(True, description="Skip torch.compile: starts in seconds instead of about a minute.")


class ServeParams(EngineParams):
    """Parameters of `ragbatch serve`: the model as an OpenAI-compatible service on loopback."""

    host: str = Field("127.0.0.1", description="Address to listen on; another than loopback needs an API key (RAGBATCH_LLM_API_KEY).")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    data_parallel_size: int = Field(
        1, ge=1, description="Model copies serving side by side, each on tensor_parallel_size GPUs (GPU only); "
        "point answer runs at the server with llm_concurrency high enough to keep them busy.",
    )


class AnswerParams(StoreParams, EngineParams):
    """Parameters of the answer flow."""

    form_first: ClassVar[tuple[str, ...]] = ("questions", "collection", "out", "llm_model", "retrieval")

    questions: Path = Field(description="Question set: JSONL, CSV or Parquet with id, question, optional reference_answers and filter.")
    out: OutputFile = Field(
        None, description="Output Parquet file; parts are checkpointed beside it until the run completes. "
        "Default: <data dir>/answers/<collection>.parquet."
    )
    format: QuestionFormat = Field(QuestionFormat.auto, description="Question file format; auto detects it from the suffix.")
    top_k: int = Field(4, ge=1, le=100, description="Passages retrieved per question.")
    score_threshold: float | None = Field(
        None, description="Drop passages scoring below this: cosine similarity for dense, BM25 for sparse, the fused score for "
        "hybrid (RRF: at most 2/60, about 0.033); one above what the retrieval can score is refused."
    )
    prompt_template: Path | None = Field(None, description="Prompt template file with {context} and {question}; default: built in.")
    llm_url: Annotated[str | None, _without_credentials("give the key in llm_api_key_block or RAGBATCH_LLM_API_KEY")] = Field(
        None, description="Base URL of an OpenAI-compatible server (e.g. ragbatch serve) to use instead of the in-process engine. "
        "Key from llm_api_key_block or RAGBATCH_LLM_API_KEY. llm_model is then the served name; a vLLM server "
        "templates and counts the prompts of a model that is not on this machine.",
        json_schema_extra={"pattern": NO_URL_CREDENTIALS},
    )
    llm_api_key_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the LLM endpoint's key; default: RAGBATCH_LLM_API_KEY."
    )
    llm_concurrency: int = Field(
        8, ge=1, le=1024, description="Requests in flight to llm_url (answers, and prompt templating when the "
        "server does it); raise it for a server with several GPUs (data parallel)."
    )
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling probability mass.")
    max_tokens: int = Field(128, ge=1, description="Most tokens generated per answer.")
    seed: int = Field(0, description="Sampling seed.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (repeat the option for several).")
    batch_questions: int = Field(256, ge=1, description="Questions per generation call and checkpoint part.")
    embed_batch_size: int = Field(64, ge=1, description="Questions per forward pass of the embedding model.")
    embedding_backend: EmbeddingBackend = Field(
        EmbeddingBackend.sentence_transformers, description="What embeds the questions: sentence-transformers or vllm."
    )
    embedding_gpu_share: float = Field(
        0.1, gt=0, lt=1, description="GPU only, embedding_backend vllm: the part of gpu_memory_utilization for the "
        "query embedding engine, which runs beside the generator.",
    )
    max_question_chars: int = Field(MAX_QUESTION_CHARS, ge=1, description="Longer questions are quarantined.")
    overwrite: bool = Field(False, description="Answer every question again instead of resuming; the output is replaced when the run ends.")
    show_progress: bool = Field(False, description="Show a progress bar on the terminal.")
    retrieval: RetrievalMode = Field(RetrievalMode.hybrid, description="Retrieval: dense, sparse (BM25) or hybrid (both, fused).")
    fusion: FusionMethod = Field(FusionMethod.rrf, description="Fusion for hybrid retrieval: rrf (reciprocal rank, k=60) or dbsf.")

    @model_validator(mode="after")
    def _default_out(self) -> "AnswerParams":
        if self.out is None:
            self.out = self.data_dir / "answers" / f"{self.collection}.parquet"
        if replaced_file(self.out) == self.questions.resolve():  # --overwrite replaced the question set
            raise ValueError(f"out is the questions file {self.questions}; give the answers another file")
        return self

    @model_validator(mode="after")
    def _a_threshold_some_passage_can_reach(self) -> "AnswerParams":
        """A cosine-like threshold on hybrid RRF scores (at most 2/60) dropped every passage, without a word."""
        highest = highest_score(self.retrieval, self.fusion)
        if self.score_threshold is not None and highest is not None and self.score_threshold > highest:
            fused = f" with {self.fusion.value} fusion" if self.retrieval == RetrievalMode.hybrid else ""
            raise ValueError(f"score_threshold {self.score_threshold} is above the highest score of {self.retrieval.value} "
                             f"retrieval{fused} ({highest:.4g}): every passage would be dropped")
        return self

    @model_validator(mode="after")
    def _embedding_share_within_the_engines(self) -> "AnswerParams":
        if self.embedding_backend == EmbeddingBackend.vllm and self.embedding_gpu_share >= self.gpu_memory_utilization:
            raise ValueError(f"embedding_gpu_share ({self.embedding_gpu_share}) must be smaller than "
                             f"gpu_memory_utilization ({self.gpu_memory_utilization}), which it is part of")
        return self


class EvaluateParams(StoreParams):
    """Parameters of the evaluate flow."""

    form_first: ClassVar[tuple[str, ...]] = ("dataset", "collection", "retrieval", "answers")

    dataset: Path = Field(
        description="A BEIR directory (corpus.jsonl, queries.jsonl, qrels/) or a question set (JSONL, CSV or Parquet) "
        "with reference_answers and optionally the relevant documents in `source` or `relevant_doc_ids`."
    )
    split: str = Field("test", pattern=r"^[A-Za-z0-9_.-]+$", description="BEIR qrels split: qrels/<split>.tsv.")
    retrieval: RetrievalMode = Field(RetrievalMode.hybrid, description="Retrieval: dense, sparse (BM25) or hybrid (both, fused).")
    fusion: FusionMethod = Field(FusionMethod.rrf, description="Fusion for hybrid retrieval: rrf (reciprocal rank, k=60) or dbsf.")
    depth: int = Field(
        300, ge=100, le=2000,
        description="Chunks retrieved per query (and per branch of hybrid) before they are mapped to documents; a query "
        "whose chunks name fewer than 100 documents is searched again twice as deep (up to 16,000).",
    )
    answers: Path | None = Field(None, description="Answers Parquet of `ragbatch answer` on this dataset: adds answer metrics.")
    out: OutputFile = Field(None, description="Per-query Parquet output; the summary JSON goes beside it. Default: the run directory.")
    embed_batch_size: int = Field(64, ge=1, description="Queries per forward pass of the embedding model.")
    max_question_chars: int = Field(
        MAX_QUESTION_CHARS, ge=1, description="A question set's longer questions are quarantined (as by the answer flow)."
    )
    show_progress: bool = Field(False, description="Show a progress bar on the terminal.")

    @model_validator(mode="after")
    def _out_is_not_an_input(self) -> "EvaluateParams":
        """The metrics (and the summary beside them) replaced the answers or the question set they read:
        RAGBATCH_OUT set for an answer run, say, or one path reached through `..` or a linked directory."""
        if self.out is not None:
            out = replaced_file(self.out)
            written = {out, out.with_name(out.stem + ".summary.json")}
            for name, read in (("answers", self.answers), ("dataset", self.dataset)):
                if read is not None and read.resolve() in written:
                    raise ValueError(f"out {self.out} (or the summary beside it) would replace the {name} file {read}; "
                                     "give the metrics another file")
        return self


class PrefectServerParams(RagbatchSettings):
    """Parameters of `ragbatch server`: a local Prefect server, prefect.yaml's work pools and deployments, and their workers."""

    # Flags --host and --port, but variables of their own (RAGBATCH_UI_HOST, RAGBATCH_UI_PORT): a shared
    # RAGBATCH_HOST, meant for `ragbatch serve`, put this unauthenticated server on every interface.
    ui_host: str = Field("127.0.0.1", description="Address the Prefect server listens on.", json_schema_extra={"flag": "--host"})
    ui_port: int = Field(4200, ge=1, le=65535, description="Port of the Prefect server and its UI.", json_schema_extra={"flag": "--port"})
    project_dir: Path = Field(
        default_factory=Path.cwd, description="Directory holding prefect.yaml; deployments run from there."
    )
    deploy: bool = Field(True, description="Deploy everything in prefect.yaml on start.")
    worker: bool = Field(True, description="Start a worker for each work pool of prefect.yaml's deployments.")
