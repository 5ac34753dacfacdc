"""Fetch throughput: `dsbuild`'s fetch stage vs plain `huggingface_hub.snapshot_download`, same server, same run.

A generated multi-file checkpoint (>= 1 GB by default, DeepSeek-V3.2 layout, tensors consistent with its config.json
so that the fetch stage's validation really runs) is served by the local test hub (tests/support/hub_server.py) on
127.0.0.1. Each round downloads it into a fresh cache twice, in alternating order:

* baseline: ``snapshot_download(repo, cache_dir=..., max_workers=W)`` (no verification beyond sizes);
  both runs are timed until their data is on disk (``os.sync()``), since dsbuild fsyncs every verified blob;
* dsbuild: the fetch stage through the stage engine (resolve commit, tree, disk check, parallel download with
  streaming sha256 verification against the LFS oids, hard links into weights/, safetensors/index/catalogue checks,
  manifest with digests).

Prints the ratio of median throughputs (target >= 0.70), ``--json`` for data, ``--png`` for a plot.

    PYTHONPATH=. python benchmarks/bench_fetch.py --size-gb 1.0 --rounds 3 --png build/bench_fetch.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.hub_server import HubServer, served_repo  # noqa: E402  (no huggingface_hub import yet)

REPO_ID = "bench/synthetic-v32"
# Tiny's shape scaled up: ~125 MB per decoder layer; the layer count sets the total size.
BENCH_OVERRIDES = {"hidden_size": 2048, "intermediate_size": 2048, "moe_intermediate_size": 1024,
                   "n_routed_experts": 16}


def synthetic_config(size_gb: float):
    from builder.model.catalog import build_catalog, total_bytes
    from builder.model.config import tiny_config

    layers = 2
    while True:
        cfg = tiny_config("tiny", {**BENCH_OVERRIDES, "num_hidden_layers": layers})
        if total_bytes(build_catalog(cfg)) >= size_gb * 1e9:
            return cfg
        layers += 1


def write_synthetic_checkpoint(out: Path, cfg) -> int:
    """Safetensors shards (one per layer, like make-tiny) with random finite values, the index, and config.json."""
    from builder.model.catalog import build_catalog
    from builder.model.safetensors_io import INDEX_NAME, shard_file_name

    groups: dict[object, list] = {}
    for t in build_catalog(cfg):
        groups.setdefault(t.layer if t.layer is not None else ("head" if t.name.startswith(("lm_head", "model.norm"))
                                                                else "embed"), []).append(t)
    order = ["embed", *sorted(k for k in groups if isinstance(k, int)), "head"]
    out.mkdir(parents=True, exist_ok=True)
    # Random bytes with each byte's top two bits cleared and its lowest set: every BF16, F32 and FP8 value they make
    # is finite and positive (no all-ones exponent, no sign bit, a nonzero exponent), which fetch's checks require.
    noise = ((np.frombuffer(os.urandom(64 << 20), dtype=np.uint8) & 0x3F) | 0x01).tobytes()
    weight_map, total = {}, 0
    for i, key in enumerate(order, start=1):
        name = shard_file_name(i, len(order))
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in groups[key]:
            header[t.name] = {"dtype": t.dtype.value, "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
            weight_map[t.name] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            left = offset
            while left:
                n = min(left, len(noise))
                fh.write(noise[:n])
                left -= n
        total += offset
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    return sum(p.stat().st_size for p in out.iterdir())


def run_baseline(endpoint: str, cache: Path, workers: int) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(REPO_ID, cache_dir=str(cache), max_workers=workers, endpoint=endpoint)


def run_dsbuild(cache: Path, run_dir: Path, workers: int) -> dict:
    from builder.pipeline import run_pipeline
    from builder.specs import RunSpec
    from builder.stages import fetch

    spec = RunSpec(model=REPO_ID, cache_dir=cache, fetch_workers=workers, out=run_dir)
    results = run_pipeline(spec, [fetch.STAGE], run_dir=run_dir, log=lambda m: None)
    return results[0].info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint and caches go (default: a temp dir, removed afterwards)")
    ap.add_argument("--no-sync", action="store_true",
                    help="stop the clock without os.sync(): dsbuild's per-blob fsync is then charged, the baseline's "
                         "unflushed pages are not")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--png", type=Path, default=Path("build/bench_fetch.png"))
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-fetch-"))
    work.mkdir(parents=True, exist_ok=True)
    server = HubServer().start()
    os.environ["HF_ENDPOINT"] = server.url  # before huggingface_hub reads its constants
    os.environ["HF_HUB_CACHE"] = str(work / "hf-config-cache")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        ckpt = work / "checkpoint"
        cfg = synthetic_config(args.size_gb)
        if not (ckpt / "config.json").is_file():
            write_synthetic_checkpoint(ckpt, cfg)
        repo = server.add(served_repo(REPO_ID, ckpt))
        size = sum(f.size for f in repo.files.values())
        rows: list[dict] = []
        for r in range(args.rounds):
            order = ("baseline", "dsbuild") if r % 2 == 0 else ("dsbuild", "baseline")
            for who in order:
                cache = work / f"round{r}-{who}"
                shutil.rmtree(cache, ignore_errors=True)
                os.sync()  # start each run with no dirty pages left by the previous one
                t0 = time.perf_counter()
                if who == "baseline":
                    run_baseline(server.url, cache / "hub", args.workers)
                else:
                    info = run_dsbuild(cache, cache / "run", args.workers)
                    assert info["verified_files"] == len(repo.files), info
                # Both are timed until their bytes are on disk: dsbuild fsyncs each verified blob before naming it,
                # snapshot_download does not, and its dirty pages would otherwise slow whichever run came next.
                if not args.no_sync:
                    os.sync()
                wall = time.perf_counter() - t0
                rows.append({"round": r, "who": who, "wall_s": round(wall, 3), "mb_per_s": round(size / wall / 1e6, 1)})
                if not args.json:
                    print(f"round {r} {who:8s} {wall:6.2f} s  {size / wall / 1e6:7.1f} MB/s", flush=True)
                shutil.rmtree(cache, ignore_errors=True)
        base = statistics.median(x["mb_per_s"] for x in rows if x["who"] == "baseline")
        ours = statistics.median(x["mb_per_s"] for x in rows if x["who"] == "dsbuild")
        result = {"bytes": size, "files": len(repo.files), "workers": args.workers, "rounds": rows,
                  "baseline_mb_per_s": base, "dsbuild_mb_per_s": ours, "ratio": round(ours / base, 3),
                  "target": 0.70, "cpus": os.cpu_count(), "synced": not args.no_sync}
        plot(result, args.png)
        result["png"] = str(args.png)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{len(repo.files)} files, {size / 1e9:.2f} GB; snapshot_download {base:.1f} MB/s, dsbuild fetch "
                  f"(verified) {ours:.1f} MB/s; ratio {ours / base:.2f} (target >= 0.70); plot {args.png}")
    finally:
        server.stop()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for who, colour in (("baseline", "tab:gray"), ("dsbuild", "tab:blue")):
        pts = [x for x in result["rounds"] if x["who"] == who]
        ax.plot([x["round"] for x in pts], [x["mb_per_s"] for x in pts], "o-", color=colour,
                label=("snapshot_download" if who == "baseline" else "dsbuild fetch (verified)"))
    ax.axhline(result["baseline_mb_per_s"] * 0.7, color="tab:red", ls="--", lw=1, label="70 % of baseline median")
    ax.set_xlabel("round")
    ax.set_ylabel("MB/s")
    ax.set_title(f"fetch {result['bytes'] / 1e9:.2f} GB, {result['files']} files, {result['workers']} workers: "
                 f"ratio {result['ratio']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)



if __name__ == "__main__":
    main()
