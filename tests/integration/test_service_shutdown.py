"""Closing the reference engine's service (Triton unloading the CPU model at shutdown) must not wait for generations
whose clients may be long gone: Triton counts its exit timeout while the model unloads, and a model still
generating past it makes tritonserver exit 1. Running requests end at the next token boundary with an error saying
why; queued ones are answered as not run; under whole-batch scheduling (attention-DP) the batch in flight ends
first. Each case has a service of its own (one multi-rank service per process), so it is not shared with
tests/integration/test_continuous_batching.py."""

from __future__ import annotations

import pytest

from builder.engine.sampling import GenerationRequest
from builder.engine.service import CLOSED_BEFORE_RUN, SHUTTING_DOWN, EngineService
from builder.sampling_params import SamplingParams
from tests.support.engines import LAYOUTS, SchedulerClient, build_bundle, fixed_prompts

MAX_TOKENS = 120  # far more tokens than a close takes to land


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2-adp"])
def test_closing_stops_running_requests_at_a_token_boundary_and_answers_queued_ones(layout, tiny_ckpt,
                                                                                    tmp_path_factory):
    bundle = build_bundle(tiny_ckpt, tmp_path_factory.mktemp("shutdown") / layout, **LAYOUTS[layout])
    prompt = fixed_prompts()[0]
    with EngineService(bundle, threads_per_rank=1) as service:
        sched = service.scheduler(max_batch=1)
        client = SchedulerClient(sched)
        client.submit("running", GenerationRequest(prompt, SamplingParams(max_tokens=MAX_TOKENS)))
        client.wait_tokens("running", 2)
        client.submit("queued", GenerationRequest(prompt, SamplingParams(max_tokens=4)))
        service.close()
        client.wait_done("running", "queued")
    running, queued = client.results["running"], client.results["queued"]
    assert (queued.finish_reason, queued.error, queued.token_ids) == ("error", CLOSED_BEFORE_RUN, [])
    if sched.continuous:
        assert (running.finish_reason, running.error) == ("error", SHUTTING_DOWN)
        assert 2 <= len(client.tokens["running"]) < MAX_TOKENS
    else:
        assert running.finish_reason == "length" and len(running.token_ids) == MAX_TOKENS
