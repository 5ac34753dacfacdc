"""Continuous batching in the reference engine (``EngineService.scheduler``) on real multi-rank worlds: requests
join a running batch at token boundaries and leave it when done or cancelled, with the join/leave events crossing
to the other ranks in the command protocol; every request's tokens are the ones it gets alone (greedy, penalized
and seeded sampling); one request whose sampling fails -- at any step -- fails alone and the service carries on."""

from __future__ import annotations

import pytest

from builder.engine.sampling import GenerationRequest
from builder.sampling_params import SamplingParams
from tests.support.engines import LAYOUTS, SchedulerClient, build_bundle, fixed_prompts

SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7)
PENALIZED = SamplingParams(max_tokens=10, presence_penalty=0.6, frequency_penalty=0.9)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def svc(request, tiny_ckpt, tmp_path_factory):
    from builder.engine.service import EngineService

    bundle = build_bundle(tiny_ckpt, tmp_path_factory.mktemp("cb") / request.param, **LAYOUTS[request.param])
    with EngineService(bundle, threads_per_rank=1) as service:
        yield service


def requests():
    a, b, c = fixed_prompts()
    return {"long": GenerationRequest(a, SamplingParams(max_tokens=30)),
            "sampled": GenerationRequest(b, SAMPLED),
            "penalized": GenerationRequest(c, PENALIZED),
            "one": GenerationRequest(b[:3], SamplingParams(max_tokens=1))}


def test_requests_that_join_a_running_batch_get_the_tokens_they_get_alone(svc):
    reqs = requests()
    alone = {name: svc.generate([r])[0] for name, r in reqs.items()}
    sched = svc.scheduler(max_batch=8)
    client = SchedulerClient(sched)
    client.submit("long", reqs["long"])
    client.wait_tokens("long", 3)
    client.submit("sampled", reqs["sampled"])  # joins while "long" runs (seeded: same draws as alone)
    client.wait_tokens("sampled", 2)
    client.submit("penalized", reqs["penalized"])
    client.submit("one", reqs["one"])
    client.wait_done(*reqs)
    for name, res in client.results.items():
        assert (res.token_ids, res.finish_reason, res.error) == \
            (alone[name].token_ids, alone[name].finish_reason, None), name
        assert client.tokens[name] == res.token_ids  # streamed, token by token
    if sched.continuous:
        assert client.started["sampled"] >= 2 and client.started["penalized"] >= 2  # joined a running batch
        assert client.finished_order.index("sampled") < client.finished_order.index("long")
    else:  # attention-DP: whole batches; a request waits for the batch in flight to end
        assert client.started["sampled"] == 1
    assert svc.broken is None


def test_a_cancelled_request_leaves_at_the_next_token_and_the_others_go_on(svc):
    reqs = requests()
    alone = svc.generate([reqs["penalized"]])[0]
    sched = svc.scheduler(max_batch=8)
    if not sched.continuous:
        pytest.skip("whole-batch scheduling (attention-DP) cannot drop a row mid-batch")
    client = SchedulerClient(sched)
    ticket = client.submit("long", GenerationRequest(reqs["long"].prompt_ids, SamplingParams(max_tokens=60)))
    client.submit("penalized", reqs["penalized"])
    client.wait_tokens("long", 3)
    sched.cancel(ticket)
    client.wait_done("long", "penalized")
    cancelled = client.results["long"]
    assert cancelled.finish_reason == "cancelled" and 3 <= len(cancelled.token_ids) < 60
    assert client.results["penalized"].token_ids == alone.token_ids


def poison_after(monkeypatch, seed: int, good_draws: int):
    """Rank 0's sampler raises for requests with ``seed`` after ``good_draws`` draws (tokens produced before the
    failure: the failure lands mid-generation, not before the first token)."""
    import builder.engine.sampling as sampling

    real, calls = sampling.sample, {"n": 0}

    def sample(logits, params, gen, history=()):
        if params.seed == seed:
            calls["n"] += 1
            if calls["n"] > good_draws:
                raise RuntimeError("injected sampling failure")
        return real(logits, params, gen, history)

    monkeypatch.setattr(sampling, "sample", sample)
    return calls


def test_a_request_whose_sampling_fails_mid_generation_fails_alone(svc, monkeypatch):
    if svc.bundle.layout.pp > 1:
        pytest.skip("the sampler rank is a worker process here; the failure is injected on rank 0")
    reqs = requests()
    alone = {name: svc.generate([reqs[name]])[0] for name in ("long", "penalized")}
    poisoned = GenerationRequest(reqs["sampled"].prompt_ids, SamplingParams(max_tokens=20, temperature=0.7, seed=666))
    calls = poison_after(monkeypatch, 666, good_draws=3)
    # A batch call: the poisoned request's result carries the error; the others are untouched.
    got = svc.generate([reqs["long"], poisoned, reqs["penalized"]])
    assert got[1].finish_reason == "error" and "injected sampling failure" in got[1].error
    assert len(got[1].token_ids) == 3
    assert [got[0].token_ids, got[2].token_ids] == [alone["long"].token_ids, alone["penalized"].token_ids]
    # The running batch: the same, with the poisoned request joining mid-way.
    calls["n"] = 0
    client = SchedulerClient(svc.scheduler(max_batch=8))
    client.submit("long", reqs["long"])
    client.wait_tokens("long", 2)
    client.submit("poisoned", poisoned)
    client.submit("penalized", reqs["penalized"])
    client.wait_done("long", "poisoned", "penalized")
    assert client.results["poisoned"].finish_reason == "error"
    assert client.tokens["poisoned"] == client.results["poisoned"].token_ids and len(client.tokens["poisoned"]) == 3
    assert client.results["long"].token_ids == alone["long"].token_ids
    assert client.results["penalized"].token_ids == alone["penalized"].token_ids
    assert svc.broken is None
    monkeypatch.undo()
    assert svc.generate([reqs["long"]])[0].token_ids == alone["long"].token_ids


def test_extreme_sampling_values_through_the_running_batch_end_cleanly(svc):
    """Issue 18's examples and their neighbours, each joining a batch with a normal request: no error, the normal
    request keeps its tokens."""
    reqs = requests()
    normal = svc.generate([reqs["long"]])[0]
    greedy = svc.generate([GenerationRequest(reqs["penalized"].prompt_ids, SamplingParams(max_tokens=8))])[0]
    sched = svc.scheduler(max_batch=8)
    extremes = [dict(temperature=1e-40), dict(temperature=2.0 ** -149), dict(temperature=3.4e38),
                dict(presence_penalty=-3e38, temperature=0.8), dict(frequency_penalty=-3e38),
                dict(presence_penalty=3e38, frequency_penalty=3e38, temperature=1e-30),
                dict(temperature=1e-40, top_p=2.0 ** -149, top_k=1)]
    for i, extreme in enumerate(extremes):
        client = SchedulerClient(sched)
        client.submit("normal", reqs["long"])
        client.submit("extreme", GenerationRequest(reqs["penalized"].prompt_ids,
                                                   SamplingParams(max_tokens=8, seed=i, **extreme)))
        client.wait_done("normal", "extreme")
        res = client.results["extreme"]
        assert res.error is None and len(res.token_ids) == 8, (extreme, res)
        if extreme.get("temperature") == 1e-40 and "presence_penalty" not in extreme:
            assert res.token_ids == greedy.token_ids  # the T -> 0 limit is the argmax
        assert client.results["normal"].token_ids == normal.token_ids
    assert svc.broken is None

