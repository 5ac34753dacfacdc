"""The OpenAI-compatible endpoint (`dsbuild serve --openai-port`) in front of the tiny model's CPU repository on a
real tritonserver, driven with the official ``openai`` client. Expected texts come from Triton's own generate
endpoint (HTTP) for the same prompt, so what the endpoint answers is checked against what Triton serves."""

from __future__ import annotations

import asyncio
import re
import json

import numpy as np
import pytest

from tests.support.served import build_cpu_run, serve_repo

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("triton-openai")]

MODEL = "tensorrt_llm"
PROMPT = "Elizabeth was"
CHAT = [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Who is Mr. Darcy?"}]
N = 8  # tokens per request


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    return build_cpu_run(tmp_path_factory.mktemp("openai-run"), cache_dir, concurrency=16)


@pytest.fixture(scope="module")
def served(run, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai-log") / "triton.log"
    with serve_repo(run / "package" / "triton_repo", log, openai=True) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://{served.openai}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def encoding(run):
    from builder.model.chat_encoding import ChatEncoding

    return ChatEncoding.from_checkpoint(run / "engines")


def triton_generate(served, prompt: str, **params) -> str:
    """Triton's HTTP generate endpoint, the model's own answer for ``prompt``."""
    from builder.sampling_params import SamplingParams
    from triton_repo.client import GenerateOptions, generate

    sampling = SamplingParams(max_tokens=params.pop("max_tokens", N), **params)
    return generate(served.http, GenerateOptions(prompt=prompt, sampling=sampling), protocol="http").text


def prompt_tokens(run, prompt: str) -> int:
    """How many tokens the model itself sees for ``prompt`` (its tokenizer files, BOS as they say)."""
    from builder.engine.bundle import EngineBundle
    from builder.engine.text import encode_prompt

    bundle = EngineBundle.open(run / "engines")
    return len(encode_prompt(bundle, bundle.tokenizer(), prompt))


def test_models_lists_the_triton_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_tritons_greedy_text_with_usage(client, served, run):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == triton_generate(served, PROMPT, temperature=0.0)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens(run, PROMPT), N)
    assert out.usage.total_tokens == out.usage.prompt_tokens + N


def test_streamed_completion_adds_up_and_reports_usage_last(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 2 and "".join(texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N
    assert all(c.usage is None for c in chunks[:-1])


def test_echo_puts_the_prompt_first(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert out.choices[0].text == PROMPT + plain.choices[0].text


def test_sampling_parameters_reach_the_model(client, served):
    params = dict(temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.8)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, **params)
    assert out.choices[0].text == triton_generate(served, PROMPT, **params)
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text != greedy.choices[0].text  # the parameters changed something


def test_stop_string_cuts_the_text_and_no_chunk_shows_part_of_it(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0).choices[0].text
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    cut = greedy[:greedy.find(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    chunks = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0, stop=stop, stream=True)]
    assert "".join(chunks) == cut


def test_chat_is_tritons_text_for_the_encoded_conversation(client, served, run, encoding):
    prompt = encoding.render(CHAT)
    assert prompt.endswith("<｜User｜>Who is Mr. Darcy?<｜Assistant｜></think>")
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=N, temperature=0)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == triton_generate(served, prompt, temperature=0.0)
    assert out.choices[0].finish_reason == "length" and out.object == "chat.completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens(run, prompt), N)


def test_streamed_chat_in_thinking_mode_sends_reasoning(client, served, encoding):
    prompt = encoding.render(CHAT, thinking=True)
    assert prompt.endswith("<｜Assistant｜><think>")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=N, temperature=0, stream=True,
        extra_body={"chat_template_kwargs": {"thinking": True}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    # The tiny model never closes its thinking: everything it wrote is reasoning, cut by max_tokens.
    assert (reasoning, content) == (triton_generate(served, prompt, temperature=0.0), "")
    assert chunks[-1].choices[0].finish_reason == "length"


def test_multi_turn_chat_with_tool_history(client, served, encoding):
    messages = CHAT + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup", "arguments": json.dumps({"name": "Darcy", "limit": 2})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A gentleman of Derbyshire."}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=N, temperature=0)
    prompt = encoding.render(messages)
    assert '<｜DSML｜parameter name="limit" string="false">2</｜DSML｜parameter>' in prompt
    assert out.choices[0].message.content == triton_generate(served, prompt, temperature=0.0)


def test_tool_definitions_count_against_the_context(client):
    """The tools section alone is ~1000 tokens in the tiny tokenizer, over its 512-token context: a clear 400."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=tools, max_tokens=N)
    assert err.value.code == "context_length_exceeded" and "512 tokens" in err.value.message


@pytest.mark.parametrize("call, param, code", [
    (dict(prompt=PROMPT, extra_body={"best_of_n": 2}), "best_of_n", None),
    (dict(prompt=PROMPT, n=2), "n", "unsupported_parameter"),
    (dict(prompt=PROMPT, temperature=3), "temperature", None),
    (dict(prompt=PROMPT, top_p=0), "top_p", None),
    (dict(prompt=PROMPT, max_tokens=0), "max_tokens", None),
    (dict(prompt=PROMPT, seed=-1), "seed", None),
    (dict(prompt=PROMPT, logprobs=2), "logprobs", "unsupported_parameter"),
    (dict(prompt=PROMPT, suffix="x"), "suffix", "unsupported_parameter"),
    (dict(prompt=[1, 2, 3]), "prompt", "unsupported_parameter"),
    (dict(prompt=PROMPT, stream_options={"include_usage": True}), "stream_options", None),
    (dict(prompt=PROMPT, max_tokens=10_000_000), "max_tokens", "context_length_exceeded"),
])
def test_bad_completion_requests_are_400_naming_the_field(client, call, param, code):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, **call)
    assert err.value.status_code == 400 and err.value.param == param, err.value.body
    assert err.value.type == "invalid_request_error" and err.value.code == code


@pytest.mark.parametrize("call, param", [
    (dict(messages=[{"role": "user", "content": "x", "mood": "happy"}]), "messages[0].mood"),
    (dict(messages=[{"role": "narrator", "content": "x"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "tool", "content": "r"}]), "messages"),
    (dict(messages=CHAT, logprobs=True), "logprobs"),
    (dict(messages=CHAT, tool_choice="required", tools=[{"type": "function", "function": {"name": "f"}}]),
     "tool_choice"),
    (dict(messages=CHAT, response_format={"type": "json_object"}), "response_format"),
    (dict(messages=CHAT, extra_body={"chat_template_kwargs": {"thinking_budget": 5}}),
     "chat_template_kwargs.thinking_budget"),
])
def test_bad_chat_requests_are_400_naming_the_field(client, call, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, **call)
    assert err.value.param == param, err.value.body


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert err.value.code == "model_not_found"


def test_sixteen_streams_with_half_the_clients_leaving_early(served, client):
    """16 concurrent streamed requests; 8 clients close their connection after the first chunk (and one more
    non-streamed client times out). The other 8 get the full greedy text, and a request after them is still
    right."""
    prompts = [PROMPT, "The river"]
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=N, temperature=0).choices[0].text
                for p in prompts}

    async def one(aclient, i: int) -> str | None:
        prompt = prompts[i % 2]
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=N if i < 8 else 40,
                                                  temperature=0, stream=True)
        async with stream:
            parts = []
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                if i >= 8:
                    return None  # leaves: the context manager closes the connection mid-stream
            return "".join(parts)

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"http://{served.openai}/v1", api_key="unused", max_retries=0,
                                     timeout=300)
        try:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert results[:8] == [expected[prompts[i % 2]] for i in range(8)]
    assert results[8:] == [None] * 8
    # A non-streamed request whose client gives up is cancelled on the server the same way.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model=MODEL, prompt=PROMPT, max_tokens=60)
    after = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=N, temperature=0)
    assert after.choices[0].text == expected[PROMPT]
    assert served.proc.poll() is None


def test_tritons_own_openai_frontend_request_shape_is_refused_by_the_llmapi_model(served):
    """Triton's OpenAI frontend (26.07) sends TensorRT-LLM-backend inputs (``stream``, ``max_tokens``) to any
    non-vLLM model; the llmapi interface names them ``streaming`` and ``sampling_param_max_tokens``, and Triton
    refuses unknown inputs: the reason dsbuild serves its own endpoint (docs/serving-openai.md)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, dtype, value in (("text_input", "BYTES", np.array([b"hello"], dtype=np.object_)),
                               ("stream", "BOOL", np.array([False])), ("max_tokens", "INT32", np.array([4], np.int32))):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    errors = []
    with grpcclient.InferenceServerClient(served.grpc) as c:
        c.start_stream(callback=lambda result, error: errors.append(error))
        c.async_stream_infer(MODEL, inputs)
        c.stop_stream()  # waits for the answer
    assert isinstance(errors[0], InferenceServerException)
    assert re.search(r"unexpected inference input '(stream|max_tokens)'", errors[0].message())


def test_bench_protocol_openai(served, run, tmp_path):
    from tests.conftest import run_dsbuild

    proc = run_dsbuild("bench", "--url", served.openai, "--protocol", "openai", "--run", str(run), "--concurrency",
                       "2", "--isl", "16", "--osl", "6", "--num-requests", "4", "--warmup", "0", "--json",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    level = json.loads(proc.stdout)["levels"][0]
    assert level["ok"] == 4 and level["errors"] == 0, level["error_list"]
    assert all(r["output_tokens"] == 6 and r["finish_reason"] == "length" for r in level["requests"])
    assert level["token_count_check"]["streamed_vs_max_tokens_mismatched"] == []


def test_zz_sigterm_after_clients_left_mid_stream_stops_tritonserver_cleanly(served):
    """Requests whose clients went away (above) must still end with Triton's FINAL flag (the Python backend needs
    it even for a cancelled request), and a fully answered stream must be ended by Triton, not cancelled by the
    OpenAI layer (triton_repo/openai_api/triton_backend.py): either way the model stays referenced, never unloads,
    and tritonserver exits 1 when its exit timeout runs out."""
    import signal

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    log = "".join(served.stderr_lines)
    assert "tritonserver stopped (exit code 0)" in log, log[-2000:]
