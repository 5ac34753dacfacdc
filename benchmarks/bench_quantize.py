"""Throughput and peak memory of the streaming quantize modes (fp8 verification, bf16 dequantization).

Generates block-FP8 DeepSeek-V3.2-layout checkpoints of about 1 GB and 4 GB (bigger experts than the tiny model,
random FP8 bytes, power-of-two scales; written with the streaming writer), then, for each size, in this one run:
  - raw sequential read throughput of the same shard files (page cache dropped for them first), measured before
    and after each mode: a mode's fraction is against the mean of the two reads that bracket it, because this
    machine's (virtual, shared) disk drifts by 2-5x within minutes,
  - ``fp8`` and ``bf16`` modes, each in a fresh subprocess (peak RSS from ``getrusage``), page cache dropped first,
  - the I/O floor of ``bf16``: reading the source and writing as many bytes as ``bf16`` wrote (with the same
    direct-I/O writer), no conversion. ``bf16`` writes twice the bytes it reads, so where writing is not at least
    as fast as reading, 50 % of raw read is out of reach whatever the CPU does; the floor shows that bound.
Throughput is source bytes per second of wall time. Prints a table; ``--json`` prints the numbers; ``--png`` writes
a plot. Goals: mode throughput >= 50 % of raw read, peak RSS the same for both sizes and < 1.5 GB.

    PYTHONPATH=. python benchmarks/bench_quantize.py --sizes 1 4 --png bench_quantize.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Peak RSS is the child's VmHWM: getrusage's ru_maxrss survives fork+exec on Linux, so it would report this (parent)
# process's RSS, which holds the generated checkpoint's last pieces, whenever that is the larger.
CHILD = r"""
import json, re, resource, sys, time
from pathlib import Path
from quantize.modes import QuantJob, run_bf16, run_fp8
src, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
{"fp8": run_fp8, "bf16": run_bf16}[mode](QuantJob(src=src, out=out, mode=mode, log=lambda m: None))
wall = time.perf_counter() - t
try:
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
except (OSError, AttributeError):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_s": wall, "peak_rss_mb": peak_kb / 1024}))
"""


def make_checkpoint(root: Path, *, experts: int) -> int:
    """A DeepSeek-V3.2-layout block-FP8 checkpoint with 1024-wide experts; returns its weight bytes."""
    import torch

    from builder.atomic import atomic_write_json
    from builder.model.catalog import Dtype, build_catalog
    from builder.model.config import tiny_config
    from quantize.stream import computed, write_checkpoint

    cfg = tiny_config("tiny", {"hidden_size": 1024, "moe_intermediate_size": 1024, "n_routed_experts": experts,
                               "n_group": 4, "topk_group": 2})
    gen = torch.Generator().manual_seed(0)
    # Content does not matter for throughput (nothing compresses), so one 16 MB random pattern per dtype is tiled:
    # generating 4 GB of fresh random numbers on 2 shared cores would take longer than the measurement.
    fp8_pattern = torch.randint(0, 256, (16 << 20,), dtype=torch.uint8, generator=gen)
    fp8_pattern[(fp8_pattern & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    bf16_pattern = (torch.randn(8 << 20, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8)

    def produce(spec):
        def gen_bytes():
            if spec.dtype is Dtype.F32 and spec.is_scale:
                yield torch.pow(2.0, torch.randint(-12, -6, spec.shape, generator=gen).float())
                return
            if spec.dtype is Dtype.F32:
                yield torch.randn(spec.shape, generator=gen) * 0.02
                return
            pattern = fp8_pattern if spec.dtype is Dtype.F8_E4M3 else bf16_pattern
            n = spec.nbytes
            for start in range(0, n, pattern.numel()):
                yield pattern[: min(pattern.numel(), n - start)]
        return gen_bytes

    specs = build_catalog(cfg)
    shards: dict[object, list] = {}
    for s in specs:
        shards.setdefault(s.layer if s.layer is not None else -1, []).append(computed(s.name, s.dtype, s.shape, produce(s)))
    root.mkdir(parents=True, exist_ok=True)
    write_checkpoint(root, [shards[k] for k in sorted(shards, key=lambda k: (k is None, k))])
    atomic_write_json(root / "config.json", cfg.to_dict())
    return sum(s.nbytes for s in specs)


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths) -> tuple[float, int]:
    drop_cache(paths)
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return time.perf_counter() - t, total


def io_floor(paths, out_bytes: int, scratch: Path) -> float:
    """Seconds to read ``paths`` (page cache dropped) and write ``out_bytes`` to a new file as the reads go (each
    chunk read is written out in proportion, as ``bf16`` does), with the writer the modes use."""
    from quantize.seqwrite import SequentialWriter

    drop_cache(paths)
    total = sum(os.path.getsize(p) for p in paths)
    view = memoryview(bytearray(16 << 20))
    target = scratch / "io-floor.bin"
    written, read = 0, 0
    t = time.perf_counter()
    with SequentialWriter(target) as out:
        for p in paths:
            with open(p, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    read += n
                    share = out_bytes * read // total - written
                    for start in range(0, share, n):
                        out.write(view[: min(n, share - start)])
                    written += share
    seconds = time.perf_counter() - t
    target.unlink()
    return seconds


def run_mode(src: Path, mode: str, scratch: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-", dir=scratch))
    try:
        drop_cache(sorted(src.glob("*.safetensors")))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), mode], env=env, capture_output=True,
                             text=True, check=True)
        result = json.loads(res.stdout.strip().splitlines()[-1])
        # Bytes the mode wrote: fp8 links the verified source shards instead of copying them.
        result["out_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors")
                                  if not p.is_symlink() and p.stat().st_nlink == 1)
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="approximate checkpoint sizes, GB")
    ap.add_argument("--scratch", type=Path, default=None, help="where to generate checkpoints (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-quantize-", dir=args.scratch))
    rows = []
    try:
        for gb in args.sizes:
            # 4 MoE layers (3 decoder + MTP) x 3 matrices of 1024 x 1024 FP8 bytes per expert
            experts = max(4, int(round(gb * 1e9 / (4 * 3 * 1024 * 1024) / 4)) * 4)
            src = scratch / f"ckpt-{gb:g}gb"
            make_checkpoint(src, experts=experts)
            shards = sorted(src.glob("*.safetensors"))
            # Unmeasured: the first read after generating runs at its own speed (the virtual disk's host is still
            # writing back, or caches what was read), so one read first puts every measured one in the same state.
            raw_read(shards)
            reads = [raw_read(shards)]
            row = {"size_gb": reads[0][1] / 1e9, "experts": experts}
            written = {}
            for mode in ("fp8", "bf16"):
                r = run_mode(src, mode, scratch)
                written[mode] = r["out_bytes"]
                reads.append(raw_read(shards))
                read_bytes = reads[-1][1]
                raw_gbps = read_bytes / ((reads[-2][0] + reads[-1][0]) / 2) / 1e9
                gbps = read_bytes / r["wall_s"] / 1e9
                row[mode] = {"wall_s": round(r["wall_s"], 2), "gbps": round(gbps, 3),
                             "raw_read_gbps": round(raw_gbps, 3),
                             "fraction_of_raw_read": round(gbps / raw_gbps, 3),
                             "written_gb": round(r["out_bytes"] / 1e9, 3),
                             "peak_rss_mb": round(r["peak_rss_mb"], 1)}
            floor_s = io_floor(shards, written["bf16"], scratch)
            floor_gbps = reads[-1][1] / floor_s / 1e9
            row["bf16"]["io_floor_gbps"] = round(floor_gbps, 3)
            row["bf16"]["io_floor_fraction_of_raw_read"] = round(floor_gbps / row["bf16"]["raw_read_gbps"], 3)
            row["bf16"]["fraction_of_io_floor"] = round(row["bf16"]["gbps"] / floor_gbps, 3)
            row["raw_read_gbps"] = round(sum(b for _, b in reads) / sum(t for t, _ in reads) / 1e9, 3)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps({"rows": rows, "goals": {"fraction_of_raw_read": 0.5, "peak_rss_mb": 1536}}, indent=2))
    else:
        print(f"{'size GB':>8} {'read GB/s':>10} | {'fp8 GB/s':>9} {'frac':>6} {'RSS MB':>8} | "
              f"{'bf16 GB/s':>9} {'frac':>6} {'RSS MB':>8} | {'floor GB/s':>10} {'frac':>6}")
        for r in rows:
            f, b = r["fp8"], r["bf16"]
            print(f"{r['size_gb']:8.2f} {r['raw_read_gbps']:10.3f} | {f['gbps']:9.3f} {f['fraction_of_raw_read']:6.2f} "
                  f"{f['peak_rss_mb']:8.0f} | {b['gbps']:9.3f} {b['fraction_of_raw_read']:6.2f} {b['peak_rss_mb']:8.0f} "
                  f"| {b['io_floor_gbps']:10.3f} {b['io_floor_fraction_of_raw_read']:6.2f}")
        print("goals: fraction >= 0.50, peak RSS equal across sizes and < 1536 MB; floor: bf16's read + write, no "
              "conversion (its fraction bounds bf16's)")
    if args.png:
        plot(rows, args.png)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [f"{r['size_gb']:.1f} GB" for r in rows]
    x = range(len(rows))
    for i, mode in enumerate(("fp8", "bf16")):
        a.bar([v + 0.35 * i for v in x], [r[mode]["fraction_of_raw_read"] for r in rows], 0.35, label=mode)
        b.bar([v + 0.35 * i for v in x], [r[mode]["peak_rss_mb"] for r in rows], 0.35, label=mode)
    a.scatter([v + 0.35 for v in x], [r["bf16"]["io_floor_fraction_of_raw_read"] for r in rows], marker="_", s=400,
              color="r", zorder=3, label="bf16 I/O floor")
    a.axhline(0.5, color="k", ls="--", lw=1, label="goal")
    b.axhline(1536, color="k", ls="--", lw=1, label="goal")
    for ax, title in ((a, "throughput / raw sequential read"), (b, "peak RSS (MB)")):
        ax.set_xticks([v + 0.175 for v in x], sizes)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
