"""The OpenAI-compatible server on a tiny model (token-id prompts: it has no tokenizer); chat and the
command line on the real SmolLM2 are in tests/e2e/test_smollm2_engine.py."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from slmkit.engine import Engine, EngineConfig, SamplingParams, Server
from tests.engine.test_engine import peaked, prompts

CONFIG = EngineConfig(num_blocks=128, block_size=8, max_num_batched_tokens=64, max_batch_size=8)


def post(url: str, body, raw: bytes | None = None):
    """(status, parsed JSON or the raw text of an event stream)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
            kind = response.headers["Content-Type"]
            return response.status, json.loads(text) if kind == "application/json" else text
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read().decode())


def events(text: str) -> list:
    lines = [line for line in text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


@pytest.fixture(scope="module")
def model():
    return peaked("llama")


@pytest.fixture(scope="module")
def server(model):
    with Server(Engine(model, CONFIG), port=0, model_name="tiny", quiet=True) as running:
        yield running.start()


def expected(model, prompt, max_tokens):
    engine = Engine(model, CONFIG)
    return engine.generate(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), progress=False)[0].token_ids


def test_completion_is_the_engine_greedy_output(server, model):
    prompt = prompts(11)[0]
    status, reply = post(f"{server.url}/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 12,
                                                          "temperature": 0, "ignore_eos": True})
    assert status == 200 and reply["object"] == "text_completion" and reply["model"] == "tiny"
    choice = reply["choices"][0]
    assert choice["token_ids"] == expected(model, prompt, 12)
    assert choice["finish_reason"] == "length" and choice["text"] == ""  # no tokenizer: no text
    assert reply["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}


def test_stream_chunks_add_up_to_the_completion(server, model):
    prompt = prompts(9)[0]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    status, text = post(f"{server.url}/v1/completions", body)
    assert status == 200
    chunks = events(text)
    assert chunks[-1] == "[DONE]"
    usage, tokens = chunks[-2], [t for c in chunks[:-2] for t in c["choices"][0]["token_ids"]]
    assert tokens == expected(model, prompt, 10)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 3) + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10


def test_concurrent_requests_each_get_their_own_answer(server, model):
    batch = prompts(5, 17, 8, 23)
    replies = [None] * len(batch)

    def ask(index):
        replies[index] = post(f"{server.url}/v1/completions", {"prompt": batch[index], "max_tokens": 16,
                                                               "temperature": 0, "ignore_eos": True})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for prompt, (status, reply) in zip(batch, replies):
        assert status == 200 and reply["choices"][0]["token_ids"] == expected(model, prompt, 16)


def test_seeded_sampling_repeats(server):
    body = {"prompt": prompts(6)[0], "max_tokens": 8, "temperature": 0.9, "top_k": 20, "seed": 3, "ignore_eos": True}
    first, second = (post(f"{server.url}/v1/completions", body)[1]["choices"][0]["token_ids"] for _ in range(2))
    assert first == second and len(first) == 8


def test_models_and_health(server):
    with urllib.request.urlopen(f"{server.url}/v1/models", timeout=10) as response:
        listing = json.loads(response.read())
    assert [m["id"] for m in listing["data"]] == ["tiny"] and listing["data"][0]["max_model_len"] == 256
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/nothing", {}, 404, "no such endpoint: POST /v1/nothing"),
    ("/v1/completions", None, 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "'prompt' must be a string or a list of token ids"),
    ("/v1/completions", {"prompt": [1, 2], "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": [1, 2], "n": 2}, 400, "'n' is not supported"),
    ("/v1/completions", {"prompt": [1, 2], "logprobs": 1}, 400, "'logprobs' is not supported"),
    ("/v1/completions", {"prompt": [1, 2], "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 2.5}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": [1, 2], "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": [1, 2], "stop": 3}, 400, "'stop' must be a string or a list of strings"),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 300}, 400, "more than max_model_len 256"),
    ("/v1/completions", {"prompt": [1, 999]}, 400, "prompt token ids must be in [0, 256)"),
    ("/v1/completions", {"prompt": "hello"}, 400, "this model has no tokenizer"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "has no chat template"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "only text content parts"),
])
def test_bad_requests_get_an_openai_style_error(server, path, body, status, message):
    got, reply = post(f"{server.url}{path}", body, raw=b"{not json" if body is None else None)
    assert got == status
    assert message in reply["error"]["message"] and reply["error"]["code"] == status


def test_the_server_keeps_serving_after_bad_requests(server, model):
    post(f"{server.url}/v1/completions", {"prompt": [1, 999]})
    status, reply = post(f"{server.url}/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0,
                                                          "ignore_eos": True})
    assert status == 200 and reply["choices"][0]["token_ids"] == expected(model, [5, 6, 7], 4)
    assert not server.loop.engine.has_unfinished()


def test_an_engine_failure_fails_the_open_requests_and_the_loop_goes_on(model):
    engine = Engine(model, CONFIG)
    real_step, calls = engine.step, []

    def step_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = step_failing_once  # this engine instance only
    body = {"prompt": [3, 4, 5], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with Server(engine, port=0, quiet=True) as server:
        server.start()
        failed = post(f"{server.url}/v1/completions", body)
        status, reply = post(f"{server.url}/v1/completions", body)
    assert failed[0] == 500 and "the engine failed: RuntimeError: device lost" in failed[1]["error"]["message"]
    assert status == 200 and reply["choices"][0]["token_ids"] == expected(model, [3, 4, 5], 4)


@pytest.mark.parametrize("port", [70000, -1, "8000", True])
def test_a_bad_port_is_a_one_line_error_before_the_engine_thread_starts(model, port):
    from slmkit.errors import SlmkitError

    before = sum(thread.name == "slmkit-engine" for thread in threading.enumerate())
    with pytest.raises(SlmkitError, match=r"^port must be in 0\.\.65535, got .+$"):
        Server(Engine(model, CONFIG), port=port, quiet=True)
    assert sum(thread.name == "slmkit-engine" for thread in threading.enumerate()) == before


def test_a_taken_port_is_a_one_line_error(server, model):
    from slmkit.errors import SlmkitError

    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(SlmkitError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: "):
        Server(Engine(model, CONFIG), port=port, quiet=True)
