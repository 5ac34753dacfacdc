"""The commands every rank of the reference engine executes together, and who decides them.

Rank 0 (:class:`Driver`, inside ``EngineService`` or the torchrun entry point) validates a call, broadcasts it as
one JSON command and takes part in it; ranks 1..N-1 (:func:`serve`, in ``builder.engine.worker`` and
``builder.engine.torchrun``) execute each command as it arrives. :func:`decode` is where plain and speculative
decoding are told apart.
"""

from __future__ import annotations

from typing import Any, Callable

from builder.engine.generate import Engine
from builder.engine.sampling import GenerationRequest, GenerationResult, validate_request
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


def serve(engine: Engine) -> None:
    """Ranks 1..N-1: execute rank 0's commands until it broadcasts a stop."""
    while True:
        cmd = engine.comm.broadcast_json(src=0)
        if cmd.get("op") == "stop":
            return
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
