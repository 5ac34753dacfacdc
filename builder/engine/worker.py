"""A rank 1..N-1 of an :class:`builder.engine.service.EngineService`: joins rank 0's TCPStore, loads its rank
file, reports ready (or the error) through the store, then executes rank 0's commands until told to stop.

``python -m builder.engine.worker --engine DIR --rank R --world N --store-port P [--device cpu] [--dtype float32]``
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from builder.engine.bundle import EngineBundle
from builder.engine.distributed import LONG_TIMEOUT, backend_for, make_comm
from builder.engine.driver import serve
from builder.engine.generate import Engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ready_key(rank: int) -> str:
    return f"dsbuild/ready/{rank}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="builder.engine.worker")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--store-host", default="127.0.0.1")
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--absorb-mla", choices=("bundle", "on", "off"), default="bundle")
    return ap.parse_args(argv)


def absorb_choice(value: str) -> bool | None:
    return None if value == "bundle" else value == "on"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    store = dist.TCPStore(args.store_host, args.store_port, args.world, is_master=False,
                          timeout=timedelta(minutes=10))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.rank % torch.cuda.device_count())
    try:  # everything that can fail on bad input happens before the collective start-up
        bundle = EngineBundle.open(args.engine)
        if bundle.world_size != args.world:
            raise ValueError(f"the bundle is for {bundle.world_size} ranks, not {args.world}")
        tensors = bundle.load_rank(args.rank, dtype=DTYPES[args.dtype], device=args.device)
    except Exception as exc:  # reported to rank 0 through the store, which raises it there
        store.set(ready_key(args.rank), f"error: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    store.set(ready_key(args.rank), "ok")
    dist.init_process_group(backend_for(args.device), store=store, rank=args.rank, world_size=args.world,
                            timeout=LONG_TIMEOUT)
    comm = make_comm(bundle.layout, rank=args.rank, device=args.device)
    engine = Engine(bundle, comm, dtype=DTYPES[args.dtype], absorb_mla=absorb_choice(args.absorb_mla),
                    tensors=tensors)
    try:
        serve(engine)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
