"""``fp8-tensor``, ``int4-awq`` and ``nvfp4`` through NVIDIA ModelOpt (``mtq.quantize`` + ``export_hf_checkpoint``).

The model is transformers' ``DeepseekV32ForCausalLM`` on the source dequantized to BF16, with the fused experts
replaced by per-expert linears (``quantize.hf_experts``: ModelOpt 0.47's INT4 export fails on transformers-5 fused
experts, and per-expert modules are what the exported checkpoint must name anyway). Calibration runs the corpus
prompts through it. This holds the whole model in memory (CPU here): fine for the tiny model and small models; the
full DeepSeek-V3.2 needs ModelOpt's own multi-GPU DeepSeek flow (``gpu_commands``).

Exclusions: ModelOpt's defaults (LM head, embeddings, MoE routers) plus the DSA indexer's ``weights_proj``, which
TensorRT-LLM builds unquantized. After export: the MTP layer (not part of the transformers model) is added from the
source in BF16 and listed in ``exclude_modules``, the source's ``config.json`` is kept (transformers rewrites some
keys) with ModelOpt's ``quantization_config``, and the single exported file is re-sharded one shard per layer with
an index, tokenizer files copied.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from builder.errors import QuantizationError
from builder.model.catalog import Dtype, build_catalog, is_mtp_tensor
from builder.model.config import ModelConfig
from builder.model.safetensors_io import INDEX_NAME, read_header, write_index
from builder.model.safetensors_tensors import TORCH_DTYPES
from quantize import registry
from quantize.calib import CalibrationProgress
from quantize.formats import unquantized_linears
from quantize.hf_model import float_model
from quantize.report import reference_float
from quantize.stream import Planned, TensorReader, computed, passthrough


def modelopt_config(mode: str, model: ModelConfig) -> dict[str, Any]:
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, registry.get(mode).modelopt_cfg))
    # ModelOpt 0.47's quant_cfg is an ordered list of rules (later ones win).
    cfg["quant_cfg"].append({"quantizer_name": "*weights_proj*", "enable": False})
    for module in unquantized_linears(model, mode):
        cfg["quant_cfg"].append({"quantizer_name": f"*.{module}.*", "enable": False})
    return cfg


# How many times ModelOpt 0.47's calibration algorithms run the forward loop (modelopt/torch/quantization/
# model_calib.py: ``max_calibrate`` once; ``awq_lite`` once to cache activation statistics, once to search scales).
PASSES = {"max": 1, "awq_lite": 2}


def calibration_passes(cfg: dict[str, Any]) -> int | None:
    algorithm = cfg.get("algorithm", "max")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    return PASSES.get(method)


def quantize_and_export(src: Path, export_dir: Path, *, mode: str, model: ModelConfig, tokens: torch.Tensor,
                        progress: Callable[[str], None] = print) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    cfg = modelopt_config(mode, model)
    with TensorReader(src) as ref:
        hf = float_model(((n, reference_float(ref, n)) for n in ref.names if not n.endswith("weight_scale_inv")),
                         src / "config.json", dtype=torch.bfloat16)

    passes = calibration_passes(cfg)
    done = [0]

    def forward_loop(m):
        done[0] += 1
        what = f"calibrate {mode} pass {done[0]}" + (f" of {passes}" if passes and done[0] <= passes else "")
        with torch.no_grad(), CalibrationProgress(what, prompts=len(tokens), tokens_per_prompt=tokens.shape[1],
                                                  log=progress) as bar:
            for i in range(len(tokens)):
                m(tokens[i: i + 1])
                bar.step()

    # ModelOpt prints progress to stdout, which belongs to the CLI's --json output: send it to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        mtq.quantize(hf, cfg, forward_loop)
        export_hf_checkpoint(hf, export_dir=str(export_dir))


def plan_output(export_dir: Path, src: Path, cfg: ModelConfig) -> tuple[list[list[Planned]], list[str], TensorReader, TensorReader]:
    """Shards (embedding, one per layer incl. MTP, head) from the export plus the source's MTP layer in BF16."""
    exported = sorted(p.name for p in export_dir.glob("*.safetensors"))
    if not (export_dir / INDEX_NAME).is_file():
        if len(exported) != 1:
            raise QuantizationError(f"ModelOpt export in {export_dir} has {len(exported)} files and no index")

        names = read_header(export_dir / exported[0]).tensors
        write_index(export_dir, {n: exported[0] for n in names}, total_size=0)
    ex, source = TensorReader(export_dir), TensorReader(src)
    groups: dict[Any, list[Planned]] = {}

    def key(name: str):
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit():
            return (1, int(parts[2]))
        return (2, 0) if name.startswith(("lm_head", "model.norm")) else (0, 0)

    compensated = unquantized_consumer_fixes(ex, source, cfg)
    for name in ex.names:
        groups.setdefault(key(name), []).append(compensated.get(name) or passthrough(ex, name))
    mtp_modules: set[str] = set()
    for spec in build_catalog(cfg):
        if spec.is_scale or not is_mtp_tensor(spec.name, cfg) or spec.name not in source.layout.index.weight_map:
            continue
        if source.is_block_fp8(spec.name):
            planned = computed(spec.name, _bf16(), source.shape(spec.name),
                               lambda n=spec.name: source.dequantized_band_tasks(n, dtype=torch.bfloat16))
        else:
            planned = passthrough(source, spec.name)
        groups.setdefault(key(spec.name), []).append(planned)
        mtp_modules.add(f"model.layers.{spec.layer}.*")
    shards = [sorted(groups[k], key=lambda p: p.name) for k in sorted(groups)]
    return shards, sorted(mtp_modules), ex, source


# Linears that read a norm's output but are not quantized (so carry no pre_quant_scale): the router (excluded by
# ModelOpt) and the indexer's weights_proj (excluded by us).
UNQUANTIZED_CONSUMERS = {"input_layernorm": ("self_attn.indexer.weights_proj",), "post_attention_layernorm": ("mlp.gate",)}


def unquantized_consumer_fixes(ex: TensorReader, source: TensorReader, cfg: ModelConfig) -> dict[str, Planned]:
    """AWQ export folds the shared ``pre_quant_scale`` of a norm's quantized consumers into the norm weight
    (``g' = g / s``); the norm's unquantized consumers then see ``x / s`` too, and ModelOpt 0.47 does not compensate
    them. Rescale their input columns by ``g / g'`` so every consumer computes what it did before export. A no-op
    where the norm is unchanged (FP8, NVFP4)."""

    fixes: dict[str, Planned] = {}
    names = set(ex.names)
    for layer in range(cfg.num_hidden_layers):
        for norm, consumers in UNQUANTIZED_CONSUMERS.items():
            norm_name = f"model.layers.{layer}.{norm}.weight"
            if norm_name not in names:
                continue
            g_src = reference_float(source, norm_name)
            g_new = ex.read(norm_name).to(torch.float32)
            if torch.equal(g_src, g_new):
                continue
            ratio = torch.where(g_new != 0, g_src / g_new, torch.ones_like(g_new))
            for c in consumers:
                w = f"model.layers.{layer}.{c}.weight"
                if w in names and ex.dtype(w).value in ("BF16", "F32"):
                    dtype = ex.dtype(w)
                    fixes[w] = computed(w, dtype, ex.shape(w), lambda w=w, r=ratio, dt=dtype: [
                        (ex.read(w).to(torch.float32) * r[None, :]).to(_torch_dtype(dt))])
    return fixes


def _torch_dtype(dt):
    return TORCH_DTYPES[dt]


def _bf16():
    return Dtype.BF16


def finish_configs(export_dir: Path, src: Path, out: Path, mtp_modules: list[str], kv_cache_quant_algo: str | None) -> dict[str, Any]:
    """hf_quant_config.json and config.json of the output: ModelOpt's, with the MTP layer excluded."""
    hf_quant = json.loads((export_dir / "hf_quant_config.json").read_text())
    q = hf_quant["quantization"]
    q["exclude_modules"] = sorted(set(q.get("exclude_modules") or []) | set(mtp_modules))
    q["kv_cache_quant_algo"] = kv_cache_quant_algo
    exported_cfg = json.loads((export_dir / "config.json").read_text())
    config = json.loads((src / "config.json").read_text())
    qc = exported_cfg.get("quantization_config") or {}
    if "ignore" in qc:
        qc["ignore"] = q["exclude_modules"]
    config["quantization_config"] = qc
    config["torch_dtype"] = "bfloat16"
    return {"hf_quant_config": hf_quant, "config": config}


# Pinned upstream code for the GPU-node flow (docs/tensorrt-llm-contract.md#C-MODELOPT-1): DeepSeek's V3.2 inference
# code at the commit ModelOpt's README pins, and ModelOpt's examples/deepseek at the commit read for that contract.
DEEPSEEK_V32_REPO = "https://github.com/deepseek-ai/DeepSeek-V3.2-Exp.git"
DEEPSEEK_V32_COMMIT = "3b99a5350d260b7c2a357e82362305509e2d0724"
MODELOPT_REPO = "https://github.com/NVIDIA/TensorRT-Model-Optimizer.git"
MODELOPT_COMMIT = "19722c9ca60ce492d8ab023bde3f75c1fa6f61e5"
HADAMARD_PACKAGE = "git+https://github.com/Dao-AILab/fast-hadamard-transform.git"

# The ModelOpt amax dumps (one torch file per rank, ``amax_dict_rank{r}-mp{world}.pt``, C-MODELOPT-2) use DeepSeek's
# inference module names (``layers.L.ffn.experts.E.w{1,2,3}.input_quantizer._amax``); this turns them into the
# ``model.layers.L.mlp.experts.E.w{1,2,3}.input_scale`` float32 [1] tensors of TensorRT-LLM's W4A8 loader (amax/448,
# w1 and w3 share the expert's input so both get the larger amax; C-W4A8SCRIPT-2, C-MOE-3) and writes a safetensors
# file. It runs in the GPU container on the files the calibration just wrote there (dsbuild never unpickles).
AMAX_TO_SCALES = r"""
import re, sys, torch
from safetensors.torch import save_file
amax_dir, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pattern = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.input_quantizer\._amax$")
amax = {}
for rank in range(world):
    state = torch.load(f"{amax_dir}/amax_dict_rank{rank}-mp{world}.pt", map_location="cpu", weights_only=True)
    for key, value in state.items():
        m = pattern.match(key)
        if m:
            name = f"model.layers.{m[1]}.mlp.experts.{m[2]}.{m[3]}.input_scale"
            amax[name] = max(amax.get(name, 0.0), float(value.float().max()))
for name in [n for n in amax if n.endswith(".w1.input_scale")]:
    up = name[: -len("w1.input_scale")] + "w3.input_scale"
    amax[name] = amax[up] = max(amax[name], amax.get(up, 0.0))
if not amax:
    sys.exit(f"no expert input amax (layers.L.ffn.experts.E.wN.input_quantizer._amax) in {amax_dir}")
save_file({n: torch.tensor([max(v, 1e-12) / 448.0], dtype=torch.float32) for n, v in sorted(amax.items())}, out)
print(f"{len(amax)} input scales -> {out}")
"""


def gpu_script(*, mode: str, model_dir: str, run_dir: str, gpus: int = 8) -> str:
    """A complete bash script for an 8-GPU node (8xH200 or 16xH100) in the pinned TensorRT-LLM container: clone
    DeepSeek's V3.2 inference code and ModelOpt at their pinned commits, convert the FP8 checkpoint to DeepSeek's
    layout, calibrate with ModelOpt's ``ptq.py``, then either ModelOpt's NVFP4 export (``nvfp4``) or the experts'
    FP8 input scales as a safetensors file that ``dsbuild quantize --quant w4afp8 --act-scales`` turns into the W4AFP8
    checkpoint (every FP8 linear listed, the V3.2 indexer and the MTP layer included: ``quantize.w4afp8``). Every
    path is absolute and nothing outside ``$WORK`` is written but the final checkpoint."""
    import shlex

    if mode not in ("nvfp4", "w4afp8"):
        raise QuantizationError(f"ModelOpt's multi-GPU DeepSeek flow makes nvfp4 (and w4afp8's input scales), not {mode}")
    q = shlex.quote
    model, work = str(Path(model_dir).resolve()), str(Path(run_dir).resolve() / "gpu-quantize")
    # w4afp8 needs only the routed experts' input amax: any preset with input quantizers on them gives it.
    cfg_name = "NVFP4_DEFAULT_CFG" if mode == "nvfp4" else "FP8_DEFAULT_CFG"
    lines = [
        "#!/usr/bin/env bash",
        f"# dsbuild: {mode} for {model} on one {gpus}-GPU node (8xH200 or 16xH100), in the pinned TensorRT-LLM container.",
        "# Sources: docs/tensorrt-llm-contract.md#C-MODELOPT-1 (ModelOpt's DeepSeek flow), #C-W4A8SCRIPT-3.",
        "set -euo pipefail",
        f"MODEL={q(model)}",
        f"WORK={q(work)}",
        'mkdir -p "$WORK"',
        f'[ -d "$WORK/DeepSeek-V3.2-Exp" ] || git clone {DEEPSEEK_V32_REPO} "$WORK/DeepSeek-V3.2-Exp"',
        f'git -C "$WORK/DeepSeek-V3.2-Exp" checkout --detach {DEEPSEEK_V32_COMMIT}',
        f'[ -d "$WORK/Model-Optimizer" ] || git clone {MODELOPT_REPO} "$WORK/Model-Optimizer"',
        f'git -C "$WORK/Model-Optimizer" checkout --detach {MODELOPT_COMMIT}',
        f'pip install {HADAMARD_PACKAGE} -r "$WORK/DeepSeek-V3.2-Exp/inference/requirements.txt"',
        'pip install -e "$WORK/Model-Optimizer"',
        '(cd "$WORK/DeepSeek-V3.2-Exp/inference" && python convert.py --hf-ckpt-path "$MODEL" '
        f'--save-path "$WORK/ds-ckpt" --n-experts 256 --model-parallel {gpus})',
        f'(cd "$WORK/Model-Optimizer/examples/deepseek" && torchrun --nproc-per-node {gpus} --master_port=12346 ptq.py '
        '--model_path "$WORK/ds-ckpt" --config "$WORK/DeepSeek-V3.2-Exp/inference/config_671B_v3.2.json" '
        f'--quant_cfg {cfg_name} --output_path "$WORK/amax")',
    ]
    if mode == "nvfp4":
        lines.append('(cd "$WORK/Model-Optimizer/examples/deepseek" && ./quantize_fp8_to_nvfp4.sh --amax_path '
                     f'"$WORK/amax" --fp4_output_path "$WORK/quantized" --fp8_hf_path "$MODEL" --world_size {gpus})')
        lines.append("printf 'NVFP4 checkpoint in %q; serve it with: dsbuild run ... --quant nvfp4 --model-path %q\\n' "
                     '"$WORK/quantized" "$WORK/quantized"')
    else:
        lines += [f'python - "$WORK/amax" {gpus} "$WORK/input_scales.safetensors" <<\'PY\'',
                  AMAX_TO_SCALES.strip("\n"), "PY",
                  "# Then, on any host that sees the checkpoint (streaming, no GPU needed):",
                  "printf 'then run: dsbuild quantize --model %q --quant w4afp8 --gpu h200-sxm --act-scales %q\\n' "
                  '"$MODEL" "$WORK/input_scales.safetensors"']
    return "\n".join(lines) + "\n"


def export_tmpdir(parent: Path) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=".modelopt-export-", dir=parent)
