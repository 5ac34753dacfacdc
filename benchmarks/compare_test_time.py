"""``make test`` wall time of two checkouts, run back to back on this machine (issue 20: before/after a restructure).

Each directory is a checkout with its own ``.venv`` (``git worktree add DIR COMMIT && make -C DIR setup``). Both run
the README's test command (``pytest -q -m "not slow" -n 2 --dist loadgroup``) with ``--durations=0`` and the same
``--deselect`` list, one after the other, while the 1-minute load is sampled (report.py's ``LoadSampler``). Printed
per checkout: wall time, the pytest summary line, load range; and the per-test durations summed over the tests both
runs have (matched by test id), which compares the same work even where the suites differ.

Usage: ``python benchmarks/compare_test_time.py BEFORE_DIR AFTER_DIR [--deselect NODEID ...] [--json]``
(two full suites: 20-40 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from report import LoadSampler

DURATION = re.compile(r"^\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed).*) in [\d.]+s")


def per_test_seconds(output: str) -> dict[str, float]:
    """Setup + call + teardown seconds per test id from pytest's ``--durations=0`` table."""
    out: dict[str, float] = defaultdict(float)
    for line in output.splitlines():
        m = DURATION.match(line)
        if m:
            out[m.group(2)] += float(m.group(1))
    return dict(out)


def run_suite(checkout: Path, deselect: list[str]) -> dict:
    cmd = [str(checkout / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-m", "not slow", "-n", "2",
           "--dist", "loadgroup", "-p", "no:cacheprovider", "--durations=0"]
    for node in deselect:
        cmd += ["--deselect", node]
    t0 = time.perf_counter()
    with LoadSampler() as load:
        proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    summary = next((m.group(1) for line in proc.stdout.splitlines() if (m := SUMMARY.match(line))), "no summary")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True,
                            text=True, check=False).stdout.strip()
    return {"checkout": str(checkout), "commit": commit, "wall_s": round(wall, 1), "summary": summary,
            "load": [min(load.samples), max(load.samples)], "tests": per_test_seconds(proc.stdout)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--deselect", action="append", default=[], help="a test id left out of both runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    runs = [run_suite(d.resolve(), args.deselect) for d in (args.before, args.after)]
    common = sorted(set(runs[0]["tests"]) & set(runs[1]["tests"]))
    result = {"runs": [{k: v for k, v in r.items() if k != "tests"} for r in runs], "common_tests": len(common),
              "common_seconds": [round(sum(r["tests"][t] for t in common), 1) for r in runs],
              "after_over_before_wall": round(runs[1]["wall_s"] / runs[0]["wall_s"], 3)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r, common_s in zip(result["runs"], result["common_seconds"]):
            print(f"{r['commit']}: {r['wall_s']:.0f} s wall, load {r['load'][0]}-{r['load'][1]}, {r['summary']}; "
                  f"{common_s:.0f} s over the {len(common)} tests both have")
        print(f"after / before wall: {result['after_over_before_wall']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
