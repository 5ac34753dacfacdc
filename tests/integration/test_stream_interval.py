"""Coalesced streaming (``--stream-interval N``, TensorRT-LLM's ``stream_interval``): the option reaches llm_api.yaml
(what TensorRT-LLM reads on a GPU) and the CPU model's config.pbtxt, and the served CPU model sends one streamed
response per N tokens with the same text as one per token; dsbuild bench refuses to count such a run per response."""

from __future__ import annotations

import math

import pytest
import yaml

from builder.errors import SpecError
from builder.rundir import RunDir
from tests.conftest import run_dsbuild
from tests.support.served import direct_results, serve_repo

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("triton-cpu")]

INTERVAL = 4
PROMPT = "Elizabeth was"
TOKENS = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("stream-interval")
    run_dsbuild("run", "--tp", "1", "--pp", "1", "--stream-interval", str(INTERVAL), "--out", "run", cwd=work,
                env={"XDG_CACHE_HOME": str(cache_dir)}, check=True)
    return work / "run"


def test_the_interval_reaches_tensorrt_llm_and_the_cpu_model(run):
    assert yaml.safe_load(RunDir(run).llm_api.read_text())["stream_interval"] == INTERVAL
    config = (run / "package" / "triton_repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert f'key: "stream_interval"\n  value: {{ string_value: "{INTERVAL}" }}' in config


def test_served_streams_carry_every_nth_token_and_the_same_text(run, tmp_path):
    from builder.sampling_params import SamplingParams
    from triton_repo.client import GenerateOptions, generate

    (text, result), = direct_results(run / "engines", {"p": (PROMPT, {})}, max_tokens=TOKENS).values()
    with serve_repo(run / "package" / "triton_repo", tmp_path / "triton.log") as served:
        streamed = generate(served.grpc, GenerateOptions(prompt=PROMPT, stream=True,
                                                         sampling=SamplingParams(max_tokens=TOKENS)))
    generated = len(result.token_ids)
    assert generated > INTERVAL  # enough tokens for coalescing to show
    assert len(streamed.responses) == math.ceil(generated / INTERVAL), (generated, streamed.responses)
    assert streamed.text == text
    assert all(later.startswith(earlier) for earlier, later in zip(streamed.responses, streamed.responses[1:]))


def test_bench_refuses_to_count_coalesced_responses_as_tokens(run):
    from triton_repo.bench import refuse_coalesced_streams

    with pytest.raises(SpecError, match="every 4 tokens.*--protocol openai"):
        refuse_coalesced_streams(run)
