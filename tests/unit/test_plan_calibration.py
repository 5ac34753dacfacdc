"""The planner against every published TensorRT-LLM result it is calibrated on: each prediction within its row's
band (a regression in the speed or memory model fails here), and the data file and fitted parameters well-formed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from builder.plan.calibration import DEFAULT_BAND, METRICS, PUBLISHED, load_rows, predict
from builder.plan.hardware import EFFICIENCY_FIELDS, EFFICIENCY_FILE, GPUS

ROWS = load_rows()


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_prediction_is_within_the_rows_band(row):
    p = predict(row)
    assert p.plan.feasible or row.metric.startswith("weights"), p.plan.reasons
    lo, hi = row.band
    assert lo <= p.ratio <= hi, f"{row.id}: predicted {p.value:.4g}, published {row.value:.4g} (x{p.ratio:.3f})"


def test_rows_name_their_source_and_a_known_metric():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))
    for r in ROWS:
        assert r.metric in METRICS and r.value > 0 and r.gpu in GPUS, r.id
        assert {"repo", "path", "commit", "quote"} <= set(r.source), r.id
        if r.band != DEFAULT_BAND:  # a wider band only with the reason the model cannot do better, and not much wider
            assert len(r.band_reason) > 40 and 0.65 <= r.band[0] <= 0.8 and 1.25 <= r.band[1] <= 1.4, r.id
        assert r.acceptance is None or 1 <= r.acceptance <= r.draft_len + 1, r.id
    # The starting points are all in: perf-overview (both forms), blogs 1 and 15, MLPerf v5.1.
    groups = {r.group for r in ROWS}
    assert {"perf-overview (main)", "perf-overview (release/1.2)", "tech blog 1 (MTP)", "tech blog 15 (V3.2)",
            "tech blog 19 (V3.2 long context)", "MLPerf Inference v5.1"} <= groups
    raw = yaml.safe_load(PUBLISHED.read_text())["rows"]
    assert len(raw) == len(ROWS)
    assert sum(r.band == DEFAULT_BAND for r in ROWS) >= 0.8 * len(ROWS)


def test_fitted_parameters_are_physical():
    data = yaml.safe_load(EFFICIENCY_FILE.read_text())
    for arch in ("hopper", "blackwell"):
        p = data["generations"][arch]
        assert set(p) == set(EFFICIENCY_FIELDS)
        for k in [f for f in EFFICIENCY_FIELDS if f.endswith("_efficiency")]:
            assert 0.05 < p[k] <= 1.0, (arch, k)
        assert 1 <= p["gemm_half_rows"] <= 1024  # a few tiles of rows at most
        assert 1 <= p["layer_overhead_us"] <= 1000
        assert 1 <= p["draft_overhead_us"] <= 5000
        assert GPUS["h200-sxm" if arch == "hopper" else "b200"].hbm_efficiency == p["hbm_efficiency"]


def test_the_guide_lists_every_row():
    """docs/choosing-a-layout.md carries the calibration table (from benchmarks/plan_vs_published.py)."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "choosing-a-layout.md").read_text()
    missing = [r.id for r in ROWS if f"`{r.id}`" not in guide]
    assert not missing, missing
