"""``dsbuild bench`` against the real served tiny deployment (the serving tests' server fixture: TP2 x PP1 on
tritonserver, started by ``dsbuild serve``): every request accounted for, token counts checked against the
tokenizer and the server, failing requests reported with their message, the JSON valid against its schema."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest

from tests.conftest import REPO, run_dsbuild
from tests.integration.test_triton_cpu_serving import (  # noqa: F401  (the one server fixture)
    PROMPTS, cpu_run, expected, served)

pytestmark = [pytest.mark.server, pytest.mark.xdist_group("triton-cpu")]

SCHEMA = REPO / "triton_repo" / "bench" / "result.schema.json"


def test_bench_cli_accounts_for_every_request_and_writes_valid_json(served, cpu_run, tmp_path):  # noqa: F811
    out, png = tmp_path / "result.json", tmp_path / "bench.png"
    proc = run_dsbuild("bench", "--url", served.grpc, "--run", str(cpu_run), "--concurrency", "1,4",
                       "--isl", "24", "--osl", "6", "--num-requests", "6", "--warmup", "1", "--ttft-ms", "60000",
                       "--tpot-ms", "0.001", "--json", "--output", str(out), "--plot", str(png), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    jsonschema.validate(result, json.loads(SCHEMA.read_text()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s["concurrency"] for s in result["levels"]] == [1, 4]
    for s in result["levels"]:
        assert s["sent"] == 6 and s["ok"] + s["errors"] == s["sent"] == len(s["requests"])
        assert s["errors"] == 0, s["error_list"]
        assert s["warmup"] == {"sent": 1, "ok": 1}
        # Prompts are exactly the requested length in the model's tokenizer; the server generated max_tokens each.
        assert {r["prompt_tokens"] for r in s["requests"]} == {24}
        assert all(r["output_tokens"] == r["max_tokens"] == 6 and r["finish_reason"] == "length"
                   for r in s["requests"])
        assert s["token_count_check"]["streamed_vs_max_tokens_mismatched"] == []
        assert s["output_tokens"] == 36 and s["ttft_ms"]["count"] == 6 and s["tpot_ms"]["count"] == 6
        assert s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
        # The TPOT limit is impossible, the TTFT one generous: goodput is zero, as it must be.
        assert s["goodput"]["requests"] == 0
        assert s["predicted"]["layout"] == "tp2pp1ep1" and s["predicted"]["hardware"] == "cpu"
        assert s["measured_vs_predicted"]["tpot_ms"]["measured"] == s["tpot_ms"]["p50"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_the_server_refuses_is_counted_as_an_error_with_its_message(served, cpu_run, protocol):  # noqa: F811
    from triton_repo.bench.prompts import Length, PromptTokenizer
    from triton_repo.bench.report import count_tokens, summarize
    from triton_repo.bench.runner import BenchConfig, PlannedRequest, _run_level, plan_requests

    url = served.grpc if protocol == "grpc" else served.http
    cfg = BenchConfig(url=url, engines_dir=cpu_run / "engines", protocol=protocol, concurrency=(2,),
                      isl=Length(12), osl=Length(5), num_requests=3, warmup=0)
    tokenizer = PromptTokenizer(cfg.engines_dir)
    requests = plan_requests(cfg, tokenizer, 3)
    impossible = PlannedRequest(requests[0].prompt, 2_000_000_000)  # far beyond the model's max_seq_len
    level = asyncio.run(_run_level(cfg, 2, [requests[0], impossible, *requests[1:]], [], lambda: None))
    count_tokens(level, tokenizer)
    s = summarize(level, cfg)
    assert (s["sent"], s["ok"], s["errors"]) == (4, 3, 1)
    (err,) = s["error_list"]
    assert err["index"] == 1 and "max_seq_len" in err["message"]
    # The server's own count of the prompt (in its refusal) equals ours: prompts are as long as reported.
    assert f"prompt ({requests[0].prompt.tokens} tokens)" in err["message"]
    assert s["requests"][1]["error"] == err["message"] and s["requests"][1]["tpot_s"] is None
    assert s["output_tokens"] == 15 and s["ttft_ms"]["count"] == 3


def test_output_token_counts_equal_the_engines_own_generation(served, cpu_run, expected):  # noqa: F811
    """Counted streamed tokens and texts equal what EngineService generates directly for the same prompts."""
    from triton_repo.bench.prompts import Length, Prompt, PromptTokenizer
    from triton_repo.bench.runner import BenchConfig, PlannedRequest, _run_level

    cfg = BenchConfig(url=served.grpc, engines_dir=cpu_run / "engines", concurrency=(4,), isl=Length(8),
                      osl=Length(8), num_requests=4, warmup=0)
    tokenizer = PromptTokenizer(cfg.engines_dir)
    prompts = PROMPTS[:4]
    level = asyncio.run(_run_level(cfg, 4, [PlannedRequest(Prompt(p, tokenizer.count_prompt(p)), 8) for p in prompts],
                                   [], lambda: None))
    for record, prompt in zip(level.records, prompts):
        text, reason, n_tokens = expected[(prompt, "greedy")]
        assert record.ok, record.error
        assert (record.text, record.finish_reason, record.output_tokens) == (text, reason, n_tokens)
        assert len(record.inter_token_s) == n_tokens - 1


def test_unreachable_server_is_one_clear_error(cpu_run, tmp_path):  # noqa: F811
    from triton_repo.server import free_port

    proc = run_dsbuild("bench", "--url", f"127.0.0.1:{free_port()}", "--run", str(cpu_run), "--num-requests", "1",
                       cwd=tmp_path)
    assert proc.returncode == 9 and "cannot reach a Triton server" in proc.stderr, proc.stderr


def test_synthetic_prompts_encode_to_exactly_the_requested_lengths(cpu_run):  # noqa: F811
    from builder.engine.bundle import EngineBundle
    from builder.engine.text import encode_prompt
    from triton_repo.bench.prompts import PromptTokenizer

    tokenizer = PromptTokenizer(cpu_run / "engines")
    bundle = EngineBundle.open(cpu_run / "engines")
    tok = bundle.tokenizer()
    rng = random.Random(3)
    for n in (2, 3, 17, 100, 300):
        prompt = tokenizer.synthetic(n, rng)
        assert len(encode_prompt(bundle, tok, prompt.text)) == prompt.tokens == n


def test_dataset_prompts_jsonl_and_text(cpu_run, tmp_path):  # noqa: F811
    from builder.errors import SpecError
    from triton_repo.bench.prompts import PromptTokenizer, load_dataset

    tokenizer = PromptTokenizer(cpu_run / "engines")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "hello there"}\n\n{"prompt": "a longer prompt, with words"}\n')
    got = load_dataset(jsonl, tokenizer)
    assert [p.text for p in got] == ["hello there", "a longer prompt, with words"]
    assert [p.tokens for p in got] == [tokenizer.count_prompt(p.text) for p in got]
    text = tmp_path / "d.txt"
    text.write_text("first line\nsecond line\n")
    assert [p.text for p in load_dataset(text, tokenizer)] == ["first line", "second line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(SpecError, match="line 2"):
        load_dataset(bad, tokenizer)


def test_z_requests_cut_off_by_a_dying_server_are_errors_not_losses(served, cpu_run):  # noqa: F811
    """tritonserver is SIGKILLed while a level runs: every request still ends up ok or an error with a message."""
    import threading
    import time

    import psutil

    from triton_repo.bench.prompts import Length, PromptTokenizer
    from triton_repo.bench.report import summarize
    from triton_repo.bench.runner import BenchConfig, _run_level, plan_requests

    cfg = BenchConfig(url=served.grpc, engines_dir=cpu_run / "engines", concurrency=(4,), isl=Length(16),
                      osl=Length(60), num_requests=8, warmup=0, timeout_s=60)
    tokenizer = PromptTokenizer(cfg.engines_dir)
    requests = plan_requests(cfg, tokenizer, cfg.num_requests)
    progress: list[int] = []
    (triton,) = [p for p in psutil.Process(served.proc.pid).children() if p.name() == "tritonserver"]

    def kill_when_running():
        deadline = time.monotonic() + 120
        while not progress and time.monotonic() < deadline:  # one request done: the others are mid-stream
            time.sleep(0.05)
        triton.kill()
    killer = threading.Thread(target=kill_when_running)
    killer.start()
    level = asyncio.run(_run_level(cfg, 4, requests, [], lambda: progress.append(1)))
    killer.join()
    s = summarize(level, cfg)
    assert s["sent"] == 8 == s["ok"] + s["errors"] == len(s["requests"])
    assert 1 <= s["ok"] < 8 and s["errors"] >= 1
    assert all(e["message"] for e in s["error_list"])
    assert len(s["error_list"]) == s["errors"]
