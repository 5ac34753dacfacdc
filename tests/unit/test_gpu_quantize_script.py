"""The GPU-node script for the full model (issue 17 item 4): complete and runnable in the pinned container — DeepSeek's
V3.2 inference code and ModelOpt cloned at pinned commits, every path absolute — and its amax -> input_scale step
produces exactly the file ``dsbuild quantize --quant w4afp8 --act-scales`` needs (indexer and MTP handled by dsbuild's
writer, docs/tensorrt-llm-contract.md#C-W4A8SCRIPT-3)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.errors import QuantizationError
from builder.model.config import ModelConfig, preset, tiny_config
from quantize.modelopt_flow import DEEPSEEK_V32_COMMIT, MODELOPT_COMMIT, gpu_script
from quantize.w4afp8 import expected_act_scales, read_act_scales


@pytest.mark.parametrize("mode", ["w4afp8", "nvfp4"])
def test_script_is_complete_pinned_and_uses_absolute_paths(mode, tmp_path):
    text = gpu_script(mode=mode, model_dir="/data/DeepSeek V3.2", run_dir="/data/runs/r1")
    script = tmp_path / "s.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert f'checkout --detach {DEEPSEEK_V32_COMMIT}' in text and len(DEEPSEEK_V32_COMMIT) == 40
    assert f'checkout --detach {MODELOPT_COMMIT}' in text and len(MODELOPT_COMMIT) == 40
    assert "../" not in text  # nothing relative to a directory the user happens to be in
    assert "MODEL='/data/DeepSeek V3.2'" in text and "WORK=/data/runs/r1/gpu-quantize" in text
    # Every cd and every file argument is under $WORK or $MODEL.
    for cd in re.findall(r"\(cd (\S+)", text):
        assert cd.startswith('"$WORK/'), cd
    assert '--config "$WORK/DeepSeek-V3.2-Exp/inference/config_671B_v3.2.json"' in text
    assert "TensorRT-LLM/examples" not in text  # the upstream script drops the indexer, the MTP layer and the scales
    if mode == "w4afp8":
        assert "--act-scales" in text and "dsbuild quantize" in text


def _heredoc(text: str) -> str:
    return text.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]


def _amax_dumps(cfg: ModelConfig, root, world: int) -> dict[str, float]:
    """Synthetic ModelOpt dumps in DeepSeek's module names, split over ``world`` ranks; the per-scale maximum."""
    g = torch.Generator().manual_seed(0)
    want: dict[str, float] = {}
    per_rank = [dict() for _ in range(world)]
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for e in range(cfg.n_routed_experts):
            for w in ("w1", "w2", "w3"):
                values = torch.rand(world, generator=g) * 10 + 0.5
                for r in range(world):
                    per_rank[r][f"layers.{layer}.ffn.experts.{e}.{w}.input_quantizer._amax"] = values[r].reshape(())
                want[f"model.layers.{layer}.mlp.experts.{e}.{w}.input_scale"] = float(values.max())
            per_rank[0][f"layers.{layer}.ffn.experts.{e}.w1.weight_quantizer._amax"] = torch.tensor(3.0)  # ignored
        per_rank[0][f"layers.{layer}.attn.wq_b.input_quantizer._amax"] = torch.tensor(1.0)  # not an expert
    root.mkdir()
    for r, state in enumerate(per_rank):
        torch.save(state, root / f"amax_dict_rank{r}-mp{world}.pt")
    return want


def test_amax_step_writes_the_scales_the_w4afp8_writer_reads(tmp_path):
    cfg = tiny_config()
    want = _amax_dumps(cfg, tmp_path / "amax", world=2)
    text = gpu_script(mode="w4afp8", model_dir="/m", run_dir="/r")
    out = tmp_path / "input_scales.safetensors"
    proc = subprocess.run([sys.executable, "-", str(tmp_path / "amax"), "2", str(out)], input=_heredoc(text),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    scales = read_act_scales(out, cfg)
    assert sorted(scales) == sorted(expected_act_scales(cfg))
    for name, value in scales.items():
        amax = want[name]
        if ".w1." in name or ".w3." in name:  # gate and up share the expert's input: one (the larger) scale
            amax = max(want[name.replace(".w3.", ".w1.")], want[name.replace(".w1.", ".w3.")])
        assert value == pytest.approx(amax / 448, rel=1e-6)


def test_read_act_scales_refuses_what_the_loader_could_not_use(tmp_path):
    cfg = tiny_config()
    names = expected_act_scales(cfg)
    good = {n: torch.tensor([0.01]) for n in names}
    cases = {
        "missing": {k: v for k, v in good.items() if k != names[3]},
        "unexpected": {**good, "model.layers.0.mlp.experts.0.w1.input_scale": torch.tensor([0.01])},
        "F32 [1]": {**good, names[0]: torch.tensor([0.01, 0.02])},
        "finite positive": {**good, names[1]: torch.tensor([0.0])},
    }
    for problem, tensors in cases.items():
        path = tmp_path / f"{problem}.safetensors"
        save_file(tensors, path)
        with pytest.raises(QuantizationError, match=re.escape(problem)):
            read_act_scales(path, cfg)


def test_w4afp8_with_act_scales_needs_no_calibration_and_uses_the_file(tiny_ckpt, tmp_path):
    from quantize.modes import QuantJob, quantize

    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    scales = {n: torch.tensor([0.001 * (i + 1)], dtype=torch.float32) for i, n in enumerate(expected_act_scales(cfg))}
    path = tmp_path / "scales.safetensors"
    save_file(scales, path)
    out = tmp_path / "run" / "quantized"
    out.mkdir(parents=True)
    info = quantize(QuantJob(src=tiny_ckpt, out=out, mode="w4afp8", act_scales=path, report_logits=False,
                             log=lambda m: None))
    assert info["calibration"] == {"act_scales": str(path), "input_scales": len(scales)}
    written = {}
    for shard in out.glob("*.safetensors"):
        written.update({k: v for k, v in load_file(shard).items() if k.endswith("input_scale")})
    assert written.keys() == scales.keys()
    assert all(torch.equal(written[k], scales[k]) for k in scales)


def test_full_model_w4afp8_refusal_writes_the_script(tmp_path):
    from quantize.modes import QuantJob, _refuse_full_size

    job = QuantJob(src=tmp_path / "weights", out=tmp_path / "quantized", mode="w4afp8", gpu="h200-sxm")
    with pytest.raises(QuantizationError, match="--act-scales") as err:
        _refuse_full_size(job, preset("deepseek-v3.2"), "calibrating w4afp8 activation scales")
    script = tmp_path / "gpu-quantize-w4afp8.sh"
    assert shlex.quote(str(script)) in str(err.value) or str(script) in str(err.value)
    assert script.stat().st_mode & 0o111 and "ptq.py" in script.read_text()
