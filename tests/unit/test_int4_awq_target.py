"""``int4-awq`` cannot load in TensorRT-LLM 1.2.1 for DeepSeek (its INT4-per-group MoE goes to the W4A8 method, which
needs FP8 input scales ModelOpt's INT4_AWQ export does not write; docs/tensorrt-llm-contract.md#C-MOE-1..3): refused
for every GPU target with a pointer to w4afp8, kept for the reference engine (CPU builds) and labelled so
(issue 17 item 5)."""

from __future__ import annotations

import pytest

from builder.errors import QuantizationError
from builder.plan.spec import plan_for_spec
from builder.specs import RunSpec
from quantize import registry
from quantize.modes import check_gpu


def test_registry_labels_int4_awq_reference_engine_only():
    fmt = registry.get("int4-awq")
    assert fmt.reference_engine_only and "reference engine only" in fmt.summary
    assert fmt.runs_on("cpu")
    for arch in registry.GPU_ARCHS:
        assert not fmt.runs_on(arch)
        assert "w4afp8" in fmt.refusal(gpu="x", arch=arch)
    assert not any(f.reference_engine_only for f in registry.FORMATS.values() if f.name != "int4-awq")


@pytest.mark.parametrize("gpu", ["h200-sxm", "h100-sxm", "b200", "a100-sxm-80g", "l40s"])
def test_quantize_refuses_int4_awq_for_a_gpu_target(gpu):
    with pytest.raises(QuantizationError, match="w4afp8"):
        check_gpu("int4-awq", gpu)
    check_gpu("int4-awq", None)  # the reference engine on CPU still takes it


def test_plan_marks_int4_awq_on_gpus_infeasible_with_the_reason():
    result = plan_for_spec(RunSpec(model="deepseek-ai/DeepSeek-V3.2", quant="int4-awq", gpu="h200-sxm", nodes=2,
                                   tp=8, pp=2, ep=8))
    req = result.requested
    assert not req.feasible and any("reference-engine only" in r and "w4afp8" in r for r in req.reasons)
