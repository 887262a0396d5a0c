"""Both embedding backends give the same vectors, so an index built with one is queried with the other."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.embedding import SentenceTransformerEmbedder, VLLMEmbedder, open_embedder, vllm_on_gpu
from tasks.errors import ModelError
from tasks.models import (EmbeddingPrompts, embedding_input_limit, embedding_prompts, embedding_text_limit, prompts_of,
                          resolve_embedding_model)
from tasks.llm import engine_dtype
from tasks.settings import EmbeddingBackend

from .conftest import SAMPLE_CORPUS

TEXTS = [
    "What does error code E-219 mean?",
    "Die Wetterstation misst Wind, Regen und Temperatur.",
    "",
    (SAMPLE_CORPUS / "troubleshooting-guide.txt").read_text() * 3,  # far beyond 256 tokens: truncated alike
]

E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


@pytest.fixture(scope="module")
def prompted_model(tmp_path_factory) -> str:
    """MiniLM's directory declaring e5's prompts, as an asymmetric model's directory does."""
    directory = tmp_path_factory.mktemp("prompted") / "minilm-e5"
    directory.mkdir()
    for entry in Path(resolve_embedding_model("all-MiniLM-L6-v2")).iterdir():
        (directory / entry.name).symlink_to(entry)
    (directory / "config_sentence_transformers.json").unlink()
    (directory / "config_sentence_transformers.json").write_text(json.dumps({"prompts": E5_PROMPTS}))
    return str(directory)


@pytest.fixture(scope="module")
def vllm_embedder(tmp_path_factory, prompted_model) -> VLLMEmbedder:
    """On the prompted MiniLM, so one engine shows the vectors and the prompts alike (the flow tests run
    vLLM on MiniLM itself)."""
    return VLLMEmbedder(model_name=prompted_model, cache_dir=tmp_path_factory.mktemp("vllm-embed"))


def test_a_models_own_prompts_go_before_queries_and_documents(embedder, prompted_model):
    """e5 and bge were given queries and passages bare (worse retrieval); the prompts are the model's
    own, picked by sentence-transformers' names, and the chunk budget leaves room for the document's."""
    prompted = SentenceTransformerEmbedder(model_name=prompted_model)
    assert prompted.prompts == EmbeddingPrompts(query="query: ", document="passage: ") and embedder.prompts == EmbeddingPrompts()
    text = "Calibrate the anemometer every six months."
    document, query = prompted.embed([text]), prompted.embed([text], query=True)
    assert np.allclose(document, embedder.embed([f"passage: {text}"]), atol=1e-6)
    assert np.allclose(query, embedder.embed([f"query: {text}"]), atol=1e-6)
    assert np.allclose(query, prompted.model.encode_query([text], normalize_embeddings=True), atol=1e-6)
    assert embedding_text_limit(prompted_model) == 254 - 2 and embedding_text_limit("all-MiniLM-L6-v2") == 254  # "passage", ":"


def test_a_hub_models_prompts_and_limits_come_from_the_local_hub_cache(prompted_model, tmp_path, monkeypatch):
    """Given as a hub id (how e5 and bge are named), a model's prompts and input limit were read from no
    file: the vLLM backend embedded without prompts and titles were never cut."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--team--e5-like" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for entry in Path(prompted_model).iterdir():
        (snapshot / entry.name).symlink_to(entry)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert embedding_prompts("team/e5-like") == EmbeddingPrompts(query="query: ", document="passage: ")
    assert embedding_input_limit("team/e5-like") == 256 and embedding_text_limit("team/e5-like") == 252
    # Not cached and offline: one line, not a model silently without prompts (whose documents would be
    # embedded without theirs under a fingerprint that said otherwise once the cache held the files).
    with pytest.raises(ModelError, match=r"^cannot read config_sentence_transformers.json of model team/not-cached: "):
        embedding_prompts("team/not-cached")
    with pytest.raises(ModelError, match=r"^cannot read sentence_bert_config.json of model not a hub id!: "):
        embedding_input_limit("not a hub id!")


def test_vllm_refuses_a_model_that_leaves_its_prompt_out_of_its_pooling(prompted_model, tmp_path):
    """sentence-transformers drops the prompt's tokens from the mean there; vLLM cannot, so its vectors differed."""
    model = tmp_path / "instructor-like"
    shutil.copytree(prompted_model, model, symlinks=True)
    (model / "1_Pooling").unlink()
    (model / "1_Pooling").mkdir()
    pooling = json.loads((Path(prompted_model) / "1_Pooling" / "config.json").read_text())
    (model / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "include_prompt": False}))
    with pytest.raises(ModelError, match="instructor-like leaves its prompt out of its pooling, which vLLM cannot"):
        _ = VLLMEmbedder(model_name=str(model), cache_dir=tmp_path / "cache").llm


def test_prompts_are_picked_by_role_then_the_models_default():
    assert prompts_of({"document": "d: ", "passage": "p: ", "query": "q: "}) == EmbeddingPrompts(query="q: ", document="d: ")
    assert prompts_of({"retrieval": "r: ", "query": "q: "}, "retrieval") == EmbeddingPrompts(query="q: ", document="r: ")
    assert prompts_of({"retrieval": "r: "}) == EmbeddingPrompts()
    # sentence-transformers adds {"query": "", "document": ""} to every model; e5's passage prompt still counts.
    assert prompts_of({"query": "query: ", "document": "", "passage": "passage: "}).document == "passage: "
    assert prompts_of({"query": 5, "document": None}) == EmbeddingPrompts()  # not text: no prompt, as vLLM's loader has it


@pytest.mark.slow
def test_vllm_pooling_gives_the_sentence_transformers_vectors(vllm_embedder, prompted_model):
    sentence_transformers = SentenceTransformerEmbedder(model_name=prompted_model)
    expected, got = sentence_transformers.embed(TEXTS), vllm_embedder.embed(TEXTS)
    assert got.shape == expected.shape == (len(TEXTS), 384) and got.dtype == np.float32
    cosine = (expected * got).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine
    queries = (sentence_transformers.embed(TEXTS, query=True) * vllm_embedder.embed(TEXTS, query=True)).sum(axis=1)
    assert queries.min() >= 0.9999, queries  # each role after its prompt, as sentence-transformers puts it
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert vllm_embedder.dimension == 384 and vllm_embedder.embed([]).shape == (0, 384)
    # bfloat16 on CPUs that compute it natively (the fast path), float32 elsewhere: this test holds either to 0.9999.
    assert str(vllm_embedder.llm.model_config.dtype) == f"torch.{engine_dtype('auto')}"


def test_the_backend_is_chosen_by_configuration(tmp_path):
    vllm = open_embedder(EmbeddingBackend.vllm, model_name="all-MiniLM-L6-v2", data_dir=tmp_path, gpu_share=0.2)
    assert isinstance(vllm, VLLMEmbedder)
    assert vllm.engine_args(cuda=True)["gpu_memory_utilization"] == 0.2  # the arguments only: no GPU here
    assert "gpu_memory_utilization" not in vllm.engine_args(cuda=False)
    default = open_embedder(EmbeddingBackend.sentence_transformers, model_name="m", data_dir=tmp_path, batch_size=8)
    assert isinstance(default, SentenceTransformerEmbedder) and default.batch_size == 8


def test_vllm_runs_where_it_finds_a_gpu_and_refuses_a_device_it_would_not_honour(tmp_path):
    """vLLM has no device argument: it took the GPU with CPU settings when asked for the CPU on a GPU host,
    and GPU 0 when asked for GPU 1. Decided here for both kinds of host; the GPU one is not run."""
    assert vllm_on_gpu(None, cuda=True) and vllm_on_gpu("cuda", cuda=True)
    assert not vllm_on_gpu(None, cuda=False) and not vllm_on_gpu("cpu", cuda=False)
    with pytest.raises(ModelError, match="^device cuda:1: vLLM takes its GPUs from CUDA_VISIBLE_DEVICES, .*CUDA_VISIBLE_DEVICES=1 "):
        vllm_on_gpu("cuda:1", cuda=True)
    with pytest.raises(ModelError, match="^device cpu: vLLM embeds on the GPU it finds; to embed on cpu, use the "
                                         "sentence-transformers embedding backend$"):
        vllm_on_gpu("cpu", cuda=True)
    with pytest.raises(ModelError, match="^device cuda: vLLM sees no GPU here and embeds on the CPU; leave the device unset$"):
        _ = VLLMEmbedder(model_name="all-MiniLM-L6-v2", cache_dir=tmp_path, device="cuda").llm  # this host has no GPU


@pytest.mark.parametrize("name, message", [
    ("no-such-org/no-such-model", "^cannot load embedding model no-such-org/no-such-model: We couldn't connect to 'https://huggingface.co'"),
    ("/no/such/model", "^/no/such/model: no such model directory or file$"),
    ("{tmp}", "^cannot load embedding model {tmp}: Unrecognized model in {tmp}"),
])
def test_an_embedding_model_that_cannot_be_loaded_is_one_line(tmp_path, name, message):
    """Transformers' OSError or ValueError (a traceback at the command line before) becomes a one-line ModelError."""
    from tasks.chunking import load_tokenizer
    from tasks.errors import ModelError
    from tasks.models import resolve_embedding_model

    name, message = name.format(tmp=tmp_path), message.format(tmp=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=message):
        _ = SentenceTransformerEmbedder(model_name=name, device="cpu").model
    if not name.startswith("/no/"):
        with pytest.raises(ModelError, match="^cannot load the tokenizer of embedding model "):
            load_tokenizer(resolve_embedding_model(name))
