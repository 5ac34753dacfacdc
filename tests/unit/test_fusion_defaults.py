"""Which fusions a bundle gets by default is decided per device by measurement (builder/data/fusion/defaults.yaml)."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from builder.shard.fusion import DEVICE_DEFAULTS, FusionOptions, device_defaults
from builder.specs import resolve_spec
from builder.stages.build import fusion_of, stage

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "benchmarks" / "results" / "report.json"
FUSIONS = tuple(FusionOptions.__dataclass_fields__)


def measured(device: str) -> dict[str, list[float]]:
    if device != "cpu":  # the report's engine benchmark runs where make bench-report runs: the CPU here
        return {}
    runs = json.loads(REPORT.read_text())["benchmarks"]["engine"]["runs"]
    return {name: [v for run in runs for v in run["figures"][f"engine.fusion_{name}"]] for name in FUSIONS}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_defaults_follow_the_measurement_rule(device):
    table = yaml.safe_load(DEVICE_DEFAULTS.read_text())
    assert set(table[device]) == set(FUSIONS)
    for name, speedups in measured(device).items():
        median = statistics.median(speedups)
        assert table[device][name] is (median >= 1), \
            f"{name}: median decode speed-up {median:.2f}x on {device} over {speedups}, so it should be " \
            f"{'on' if median >= 1 else 'off'} in {DEVICE_DEFAULTS.name}"
    if not measured(device):
        assert all(table[device].values()), f"unmeasured {device}: every fusion stays on"


def test_a_bundle_gets_its_devices_defaults_and_flags_win():
    cpu = resolve_spec(cli={})
    gpu = resolve_spec(cli={"gpu": "h200-sxm", "tp": 8, "pp": 1, "model": "deepseek-v3.2"})
    assert fusion_of(cpu) == device_defaults("cpu")
    assert fusion_of(gpu) == device_defaults("cuda")
    for name in FUSIONS:
        flipped = not getattr(device_defaults("cpu"), name)
        assert fusion_of(resolve_spec(cli={name: flipped})) == replace(device_defaults("cpu"), **{name: flipped})


def test_the_resolved_fusions_key_the_build_stage():
    """A changed defaults file must rebuild bundles cached under the old defaults: the resolved set is in the key."""
    spec = resolve_spec(cli={})
    assert stage(spec).key_inputs(spec, {}) == {"fusion": fusion_of(spec).to_dict()}
    off = resolve_spec(cli={"fuse_gate_up": not device_defaults("cpu").fuse_gate_up})
    assert stage(off).key_inputs(off, {}) != stage(spec).key_inputs(spec, {})
