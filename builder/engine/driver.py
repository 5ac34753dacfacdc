"""The commands every rank of the reference engine executes together, and who decides them.

Rank 0 (:class:`Driver`, inside ``EngineService`` or the torchrun entry point) validates a call, broadcasts it as
one JSON command and takes part in it; ranks 1..N-1 (:func:`serve`, in ``builder.engine.worker`` and
``builder.engine.torchrun``) execute each command as it arrives. :func:`decode` is where plain and speculative
decoding are told apart.

Commands: ``generate`` (a batch call: every rank decodes the same requests to the end), ``logits``, ``stats``,
``stop``, and ``batch``, which opens a running batch (continuous batching): from then on rank 0 broadcasts one
update per iteration -- the requests that join (id + request), the ids that leave (cancelled) -- or ``None`` when
nothing changes (8 bytes), and every rank applies it with :func:`advance`; ``{"end": true}`` closes the batch and
returns the ranks to the command loop.
"""

from __future__ import annotations

from typing import Any, Callable

from builder.engine.generate import Engine, RunningBatch
from builder.engine.sampling import GenerationRequest, GenerationResult, RequestState, validate_request
from builder.engine.speculative import SpeculativeDecoder, SpeculativeOptions, check_options
from builder.sampling_params import SamplingParams


def decode(engine: Engine, requests: list[GenerationRequest], *, on_token: Callable[[int, int], None] | None = None,
           speculative: SpeculativeOptions | None = None, micro_batches: bool = True) -> list[GenerationResult]:
    """Generate ``requests`` on every rank: speculatively with ``speculative``, else plain (with PP, overlapped
    micro-batches unless ``micro_batches`` is False)."""
    if speculative is not None:
        return SpeculativeDecoder(engine, speculative).generate(requests, on_token=on_token)
    return engine.generate(requests, on_token=on_token, micro_batches=micro_batches)


def execute(engine: Engine, cmd: dict[str, Any]) -> Any:
    """One broadcast command on a rank other than 0."""
    op = cmd.get("op")
    if op == "stats":
        return engine.rank_stats()
    if op == "generate":
        spec = cmd.get("speculative")
        return decode(engine, [GenerationRequest.from_dict(r) for r in cmd["requests"]],
                      speculative=SpeculativeOptions.from_dict(spec) if spec else None,
                      micro_batches=cmd.get("micro_batches", True))
    if op == "logits":
        return engine.prompt_logits(cmd["prompts"])
    raise ValueError(f"unknown engine command {op!r}")


def advance(batch: RunningBatch, update: dict[str, Any] | None) -> list[RequestState]:
    """One iteration of a running batch, the same on every rank: the requests named in ``update["leave"]`` end,
    those in ``update["join"]`` are prefilled (first token), every row then gets one more token; returns the
    requests that finished in this iteration."""
    update = update or {}
    batch.end(update.get("leave", ()))
    gone = batch.retire()
    batch.join([(item["id"], GenerationRequest.from_dict(item["request"])) for item in update.get("join", ())])
    gone += batch.retire()  # a request can end at its first token
    if batch.seqs:
        batch.step()
        gone += batch.retire()
    return gone


def follow_batch(engine: Engine) -> None:
    """Ranks 1..N-1 inside a ``batch`` command: apply rank 0's updates until it ends the batch."""
    batch = RunningBatch(engine)
    while True:
        update = engine.comm.broadcast_json(src=0)
        if update is not None and update.get("end"):
            return
        advance(batch, update)


def serve(engine: Engine) -> None:
    """Ranks 1..N-1: execute rank 0's commands until it broadcasts a stop."""
    while True:
        cmd = engine.comm.broadcast_json(src=0)
        if cmd.get("op") == "stop":
            return
        if cmd.get("op") == "batch":
            follow_batch(engine)
            continue
        execute(engine, cmd)


class Driver:
    """Rank 0's side: check a call, broadcast it as a command, then take part in it."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def generate(self, requests: list[GenerationRequest], *, on_token: Callable[[int, int], None] | None = None,
                 speculative: SpeculativeOptions | None = None, micro_batches: bool = True) -> list[GenerationResult]:
        for i, r in enumerate(requests):
            validate_request(r, self.engine.cfg, i)
        if speculative is not None:
            check_options(self.engine.bundle, speculative)
        self.engine.comm.broadcast_json({"op": "generate", "requests": [r.to_dict() for r in requests],
                                         "speculative": speculative.to_dict() if speculative else None,
                                         "micro_batches": micro_batches}, src=0)
        return decode(self.engine, requests, on_token=on_token, speculative=speculative, micro_batches=micro_batches)

    # ----- a running batch (continuous batching): open, advance per iteration, close -----
    def open_batch(self, *, on_token: Callable[[Any, int], None] | None = None) -> RunningBatch:
        self.engine.comm.broadcast_json({"op": "batch"}, src=0)
        return RunningBatch(self.engine, on_token=on_token)

    def advance(self, batch: RunningBatch, *, join: list[tuple[int, GenerationRequest]] = (),
                leave: list[int] = ()) -> list[RequestState]:
        """One iteration; ``join``: (id, request) pairs already checked with :func:`validate_request`."""
        update = {"join": [{"id": k, "request": r.to_dict()} for k, r in join], "leave": list(leave)} \
            if join or leave else None
        self.engine.comm.broadcast_json(update, src=0)
        return advance(batch, update)

    def close_batch(self) -> None:
        self.engine.comm.broadcast_json({"end": True}, src=0)

    def prompt_logits(self, prompts: list[list[int]]) -> list:
        for i, p in enumerate(prompts):
            validate_request(GenerationRequest(list(p), SamplingParams(max_tokens=1)), self.engine.cfg, i)
        self.engine.comm.broadcast_json({"op": "logits", "prompts": [list(map(int, p)) for p in prompts]}, src=0)
        return self.engine.prompt_logits(prompts)

    def rank_stats(self) -> list[dict[str, int]]:
        self.engine.comm.broadcast_json({"op": "stats"}, src=0)
        return self.engine.rank_stats()

    def stop(self) -> None:
        self.engine.comm.broadcast_json({"op": "stop"}, src=0)
