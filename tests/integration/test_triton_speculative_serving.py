"""The CPU Triton flavour speculates as the build configured it: a run built with ``--spec mtp`` serves greedy text
identical to plain greedy decoding, and reports TensorRT-LLM's draft counters."""

from __future__ import annotations

import pytest

from builder.sampling_params import SamplingParams
from tests.conftest import run_dsbuild
from tests.support.served import serve_repo

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("triton-spec")]
PROMPTS = ["It is a truth universally acknowledged", "She had never seen the sea"]


@pytest.fixture(scope="module")
def mtp_run(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("spec-run")
    run_dsbuild("run", "--tp", "1", "--pp", "1", "--spec", "mtp", "--draft-len", "2", "--out", "run", cwd=work,
                env={"XDG_CACHE_HOME": str(cache_dir)}, check=True)
    return work / "run"


def test_served_mtp_greedy_equals_plain_greedy_and_counts_drafts(mtp_run, tmp_path):
    from builder.engine.service import EngineService, GenerationRequest
    from builder.engine.text import encode_prompt
    from triton_repo.client import GenerateOptions, generate

    config = (mtp_run / "package" / "triton_repo" / "tensorrt_llm" / "config.pbtxt").read_text()
    assert 'string_value: "mtp"' in config
    with EngineService(mtp_run / "engines") as engine:
        tok = engine.tokenizer()
        eos = [int(engine.bundle.cfg.raw["eos_token_id"])]
        plain = {}
        for p in PROMPTS:
            (res,) = engine.generate([GenerationRequest(prompt_ids=encode_prompt(engine.bundle, tok, p), stop_token_ids=eos, sampling=SamplingParams(max_tokens=12))])
            plain[p] = tok.decode(res.token_ids)
    with serve_repo(mtp_run / "package" / "triton_repo", tmp_path / "triton.log") as server:
        drafted = accepted = 0
        for protocol, url in (("grpc", server.grpc), ("http", server.http)):
            for p in PROMPTS:
                res = generate(url, GenerateOptions(prompt=p, sampling=SamplingParams(max_tokens=12)), protocol=protocol)
                assert res.text == plain[p], (protocol, p)
                assert 0 <= res.total_accepted_draft_tokens <= res.total_draft_tokens
                drafted += res.total_draft_tokens
                accepted += res.total_accepted_draft_tokens
        assert drafted > 0  # the served model really drafted with its MTP module
        assert accepted > 0  # and the trained MTP head got some drafts accepted
