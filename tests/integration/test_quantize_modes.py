"""Each quantize mode's output on the tiny model: the checkpoint's tensors equal ``quantized_catalog`` (names, dtypes,
shapes), the config files carry what TensorRT-LLM reads, the format dequantizes back close to the source, and the
build stage slices it. ModelOpt modes and the full CLI runs are slow (calibration + transformers)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import torch

from builder.errors import QuantizationError
from builder.model.config import ModelConfig
from builder.model.safetensors_io import validate_checkpoint
from quantize.formats import mode_of_checkpoint, quantized_catalog, unquantized_linears
from quantize.modes import QuantJob, quantize


def run_mode(src: Path, out: Path, mode: str, *, log: list[str] | None = None, **kw) -> dict:
    """``quantize`` on 4 prompts of 32 tokens; the progress lines it logs are appended to ``log``."""
    out.mkdir(parents=True, exist_ok=True)
    lines = log if log is not None else []
    return quantize(QuantJob(src=src, out=out, mode=mode, log=lines.append, calib_size=4, calib_seq_len=32, **kw))


def calibration_lines(log: list[str]) -> list[str]:
    return [line for line in log if line.startswith("calibrate ")]


def assert_matches_catalog(src: Path, out: Path, mode: str) -> dict:
    cfg = ModelConfig.from_json_file(src / "config.json")
    expected = {s.name: s for s in quantized_catalog(cfg, mode).specs}
    layout = validate_checkpoint(out, expected=expected)  # exact: no missing, no extra, same shape and dtype
    assert set(layout.index.weight_map) == set(expected)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "quant_report.json", "model.safetensors.index.json"):
        assert (out / f).is_file(), f
    assert mode_of_checkpoint(out) == mode
    hq = out / "hf_quant_config.json"
    assert hq.is_file() == (mode != "fp8")  # fp8 keeps DeepSeek's own quantization_config (contract C-MCFG-3)
    return json.loads(hq.read_text()) if hq.is_file() else None


@pytest.fixture(scope="module")
def outputs(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-modes")
    logs = {m: [] for m in ("fp8", "bf16", "w4afp8")}
    return {m: (run_mode(tiny_ckpt, root / m, m, log=logs[m], report_logits=False), root / m, logs[m]) for m in logs}


def test_fp8_passthrough_schema_and_config(outputs, tiny_ckpt):
    info, out, _ = outputs["fp8"]
    assert assert_matches_catalog(tiny_ckpt, out, "fp8") is None
    # TensorRT-LLM reads the native quantization_config and applies the MoE backend's own kv_b_proj exclusion.
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    assert info["trtllm_quant_config"].startswith("config.json quantization_config")
    assert info["fp8_weights_checked"] == 146
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["weights"]["lossless_tensors"] == rep["weights"]["tensors"] > 0


def test_fp8_refuses_nan_weights_and_bad_scales(tiny_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    shard = sorted(bad.glob("model-00002-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    scale = name[: -len("weight")] + "weight_scale_inv"
    tensors[scale] = -tensors[scale]
    shard.unlink()
    save_file(tensors, shard)
    with pytest.raises(QuantizationError, match="non-finite or non-positive"):
        run_mode(bad, tmp_path / "o1", "fp8")
    tensors[scale] = -tensors[scale]
    w = tensors[name].view(torch.uint8).clone()
    w.view(-1)[5] = 0x7F
    tensors[name] = w.view(torch.float8_e4m3fn)
    shard.unlink()
    save_file(tensors, shard)
    with pytest.raises(QuantizationError, match="NaN"):
        run_mode(bad, tmp_path / "o2", "fp8")


def test_bf16_schema_and_exact_dequantization(outputs, tiny_ckpt):
    _, out, _ = outputs["bf16"]
    hq = assert_matches_catalog(tiny_ckpt, out, "bf16")
    assert hq["quantization"]["quant_algo"] is None
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    rep = json.loads((out / "quant_report.json").read_text())
    assert rep["weights"]["lossless_tensors"] == rep["weights"]["tensors"]  # ue8m0 FP8 is exact in BF16


def test_w4afp8_layout_is_tensorrt_llm_s(outputs, tiny_ckpt):
    from quantize import int4
    from quantize.stream import TensorReader

    info, out, _ = outputs["w4afp8"]
    hq = assert_matches_catalog(tiny_ckpt, out, "w4afp8")
    assert hq["quantization"] == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8"}
    qc = json.loads((out / "quant_cfg.json").read_text())
    layers = qc["quantized_layers"]
    assert qc["quant_algo"] == "MIXED_PRECISION"
    assert layers["model.layers.1.mlp.experts"] == {"quant_algo": "W4A8_AWQ"}
    assert layers["model.layers.0.mlp.gate_up_proj"] == {"quant_algo": "FP8_BLOCK_SCALES"}
    assert layers["model.layers.1.self_attn.kv_a_proj_with_mqa"] == {"quant_algo": "FP8_BLOCK_SCALES"}
    assert layers["model.layers.2.self_attn.indexer.wq_b"] == {"quant_algo": "FP8_BLOCK_SCALES"}  # V3.2 indexer
    assert layers["model.layers.2.self_attn.indexer.wk"] == {"quant_algo": "FP8_BLOCK_SCALES"}
    from quantize.w4afp8_config import quant_cfg
    assert qc == quant_cfg(ModelConfig.from_json_file(tiny_ckpt / "config.json"), "FP8")  # the unit-tested list
    assert layers["model.layers.4.mlp.experts"] == {"quant_algo": "FP8_BLOCK_SCALES"}  # MTP layer kept in FP8
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with TensorReader(out) as r, TensorReader(tiny_ckpt) as src:
        w = "model.layers.2.mlp.experts.5.down_proj.weight"
        assert r.dtype(w).value == "I8" and r.shape(w) == (128, 512)
        assert r.read("model.layers.2.mlp.experts.5.w2.input_scale").shape == (1,)
        gate = float(r.read("model.layers.2.mlp.experts.5.w1.input_scale")[0])
        assert gate == float(r.read("model.layers.2.mlp.experts.5.w3.input_scale")[0]) > 0  # one shared input
        # Independent reference of the upstream recipe: dequantize, round to bf16, amax/7 per 128 inputs.
        ref = src.dequantized(w).to(torch.bfloat16).to(torch.float32)
        s_ref = ref.abs().view(128, 8, 128).amax(-1) / 7
        assert torch.equal(r.read(w[: -len("weight")] + "weight_scale_inv"), s_ref)
        q = int4.unpack(r.read(w), along="in").to(torch.float32)
        assert torch.equal(q, torch.clamp(torch.round(ref / s_ref.repeat_interleave(128, 1)), -8, 7))
        mtp = "model.layers.4.mlp.experts.0.gate_proj.weight"
        assert r.dtype(mtp).value == "F8_E4M3"
    rep = json.loads((out / "quant_report.json").read_text())
    assert 15 < rep["weights"]["by_kind"]["expert_down"]["min_db"] < 25  # 4-bit: ~6 dB per bit
    assert rep["weights"]["by_kind"]["q_b"]["min_db"] == "inf"  # attention stays block FP8: bit-exact


def test_nvfp4_is_refused_for_hopper_and_cpu_plans(tiny_ckpt, tmp_path):
    with pytest.raises(QuantizationError, match=r"nvfp4 needs Blackwell GPUs \(b200, gb200\); h200-sxm is hopper"):
        run_mode(tiny_ckpt, tmp_path / "h", "nvfp4", gpu="h200-sxm")
    with pytest.raises(QuantizationError, match="targets no GPU"):
        run_mode(tiny_ckpt, tmp_path / "c", "nvfp4")
    assert not any((tmp_path / "h").iterdir())


def test_cli_nvfp4_on_hopper_exits_with_one_sentence(dsbuild, tmp_path):
    # The quantize stage would refuse it, so the plan refuses it up front, --allow-infeasible or not (the quantize
    # stage's own check, the same function, is test_nvfp4_is_refused_for_hopper_and_cpu_plans).
    for extra in ((), ("--allow-infeasible",)):
        res = dsbuild("quantize", "--quant", "nvfp4", "--gpu", "h200-sxm", *extra)
        assert res.returncode == 2, res.stderr
        assert "nvfp4 needs Blackwell GPUs (b200, gb200); h200-sxm is hopper" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("quantized/*.safetensors"))


def test_calibrated_modes_show_progress(outputs):
    """Every tenth of a calibration pass is a line with prompts, tokens, time and ETA (4 prompts: each one)."""
    lines = calibration_lines(outputs["w4afp8"][2])
    assert len(lines) == 4, lines
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"calibrate w4afp8 expert inputs: {i}/4 prompts, {32 * i}/128 tokens, "), line
        assert line.endswith(" s") and " ETA " in line, line
    assert calibration_lines(outputs["fp8"][2]) == calibration_lines(outputs["bf16"][2]) == []  # nothing calibrated


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp8-tensor", "int4-awq", "nvfp4"])
def test_modelopt_modes_schema_and_quality(mode, tiny_ckpt, tmp_path):
    log: list[str] = []
    # nvfp4 is made for Blackwell only; int4-awq is reference-engine only, so for no GPU.
    run_mode(tiny_ckpt, tmp_path / mode, mode, log=log, **({"gpu": "b200"} if mode == "nvfp4" else {}))
    # progress of each of ModelOpt's passes over the prompts: max calibration one, AWQ two (cache, then search)
    passes = {"fp8-tensor": 1, "int4-awq": 2, "nvfp4": 1}[mode]
    ends = [line for line in calibration_lines(log) if " 4/4 prompts, 128/128 tokens, " in line]
    assert [line.split(":")[0] for line in ends] == [f"calibrate {mode} pass {k} of {passes}"
                                                     for k in range(1, passes + 1)], log
    hq = assert_matches_catalog(tiny_ckpt, tmp_path / mode, mode)
    q = hq["quantization"]
    assert hq["producer"]["name"] == "modelopt"
    assert q["quant_algo"] == {"fp8-tensor": "FP8", "int4-awq": "W4A16_AWQ", "nvfp4": "NVFP4"}[mode]
    assert "model.layers.4.*" in q["exclude_modules"] and "lm_head" in q["exclude_modules"]
    # TensorRT-LLM builds a linear unquantized when its module name fnmatches an exclude_modules entry
    # (QuantConfig.is_module_excluded_from_quantization): for every layer, exactly the linears the format keeps BF16
    # (nvfp4: MLA projections and the indexer, docs/tensorrt-llm-contract.md#C-NVFP4-1) and the router.
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    kept = set(unquantized_linears(cfg, mode)) | {"mlp.gate", "self_attn.indexer.weights_proj"}
    linears = {s.layer_module for s in quantized_catalog(cfg, mode).specs
               if s.layer == 1 and not s.is_scale and len(s.shape) == 2 and s.expert in (None, 0)}
    excluded = {m for m in linears if any(fnmatch.fnmatchcase(f"model.layers.1.{m}", e) for e in q["exclude_modules"])}
    assert excluded == kept & linears, sorted(excluded ^ (kept & linears))
    if mode == "int4-awq":
        assert q["group_size"] == 128 and q["pre_quant_scale"] is True
    rep = json.loads((tmp_path / mode / "quant_report.json").read_text())
    # Bound KL, and top-1 only loosely: over 128 tokens a few flips move it a lot (the trained tiny model, 16 x 64
    # tokens: fp8-tensor 0.94, int4-awq 0.87, nvfp4 0.93).
    lg = rep["logits"]
    assert lg["kl_mean"] < 0.5 and lg["top1_agreement"] > 0.15
    # Perplexity on the calibration prompts (training text): the trained model's is far below the vocabulary size,
    # the quantized model's close to it, and the delta is the one the two perplexities give.
    assert lg["ppl_reference"] < 200 and 0.8 < lg["ppl"] / lg["ppl_reference"] < 1.5
    assert lg["ppl_delta_pct"] == pytest.approx(100 * (lg["ppl"] / lg["ppl_reference"] - 1))
    assert rep["weights"]["min_db"] > {"fp8-tensor": 20, "int4-awq": 12, "nvfp4": 12}[mode]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp8", "bf16", "w4afp8", "fp8-tensor", "int4-awq", "nvfp4"])
def test_run_end_to_end_tp2_pp2(mode, dsbuild, tmp_path):
    args = ["run", "--quant", mode, "--tp", "2", "--pp", "2", "--json", "--calib-size", "4", "--calib-seq-len", "32"]
    if mode == "nvfp4":
        args += ["--gpu", "b200"]
    res = dsbuild(*args, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    status = {s["stage"]: s["status"] for s in json.loads(res.stdout)["stages"]}
    assert status["build"] == "built"
    engines = json.loads(res.stdout)["run_dir"]
    files = sorted((tmp_path / engines / "engines").glob("rank*.safetensors")) if not Path(engines).is_absolute() \
        else sorted((Path(engines) / "engines").glob("rank*.safetensors"))
    assert len(files) == 4
