"""torchrun entry point: every rank of a ``torch.distributed.run`` world loads its rank file and serves; rank 0
runs a task file and writes the results. Shares all layer code with ``EngineService``.

``python -m torch.distributed.run --nproc-per-node N [--nnodes 2 --rdzv-backend c10d --rdzv-endpoint
127.0.0.1:PORT] -m builder.engine.torchrun --engine DIR --task task.json --out result.json``

task.json: ``{"logits": [[ids...], ...], "generate": [GenerationRequest.to_dict(), ...], "speculative": {...}}``
(each optional; ``speculative`` as ``SpeculativeOptions.to_dict()``).
result.json: ``{"world_size", "generate": [{"token_ids", "finish_reason"}]}``; logits go to ``<out>.logits.safetensors``
as ``logits.{i}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from builder.atomic import atomic_write_json
from builder.engine.bundle import EngineBundle
from builder.engine.distributed import LONG_TIMEOUT, backend_for, make_comm
from builder.engine.driver import Driver, serve
from builder.engine.generate import Engine
from builder.engine.sampling import GenerationRequest
from builder.engine.speculative import SpeculativeOptions
from builder.engine.worker import DTYPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="builder.engine.torchrun")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    bundle = EngineBundle.open(args.engine)
    if bundle.world_size != world:
        print(f"error: the bundle at {args.engine} is for {bundle.world_size} ranks, torchrun started {world}",
              file=sys.stderr)
        return 2
    if world > 1:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend_for(args.device), timeout=LONG_TIMEOUT)
    comm = make_comm(bundle.layout, rank=rank, device=args.device)
    engine = Engine(bundle, comm, dtype=DTYPES[args.dtype])
    try:
        if rank != 0:
            serve(engine)
            return 0
        driver = Driver(engine)
        task = json.loads(Path(args.task).read_text())
        result: dict = {"world_size": world, "layout": bundle.layout.name,
                        "hosts": os.environ.get("GROUP_WORLD_SIZE"), "local_world": os.environ.get("LOCAL_WORLD_SIZE")}
        try:
            if task.get("logits"):
                logits = driver.prompt_logits(task["logits"])
                save_file({f"logits.{i}": t.contiguous() for i, t in enumerate(logits)},
                          str(Path(args.out).with_suffix(".logits.safetensors")))
            if task.get("generate"):
                t0 = time.perf_counter()
                spec = task.get("speculative")
                res = driver.generate([GenerationRequest.from_dict(r) for r in task["generate"]],
                                      speculative=SpeculativeOptions.from_dict(spec) if spec else None)
                result["generate_s"] = time.perf_counter() - t0
                result["generate"] = [{"token_ids": r.token_ids, "finish_reason": r.finish_reason,
                                       "total_draft_tokens": r.total_draft_tokens,
                                       "total_accepted_draft_tokens": r.total_accepted_draft_tokens} for r in res]
        finally:
            driver.stop()
        atomic_write_json(args.out, result)
        return 0
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
