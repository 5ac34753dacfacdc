"""``dsbuild check RUN_DIR``: every generated artifact of a run (or of a pulled deployment) held against the plan, against
each other and against the pinned TensorRT-LLM contract (docs/tensorrt-llm-contract.md), one line per disagreement.

What is compared (each check names the files it reads; a file that is absent is skipped, not guessed):
- plan/plan.json <-> engines/llm_api.yaml: the layout (TP, PP, EP, MoE-TP, attention-DP) and the MoE backend;
- engines/llm_api.yaml <-> package/.../model.yaml: every LLM() argument (the GPU flavour serves model.yaml);
- both against the version's allow-list and the cross-field rules (contract C-LLMARGS-1..9), and the facts the
  generated values rely on: tokens_per_block 64 for DeepSeek-V3.2 (C-DSA-2), block reuse written (C-DSA-3),
  max_num_tokens admitting every prompt max_seq_len allows unless chunked prefill is on (C-LLM-1);
- model.yaml's paths: relative to the deploy directory and present there (C-TRITON-2);
- model.yaml <-> package/launch/*: ranks per replica = TP x PP, replicas and nodes as planned (C-TRITON-3,
  C-LAUNCH-1, C-LWS-1);
- engines/config.json <-> plan: the reference engine's mapping;
- quantized/ (when present) <-> the catalogue of its format and the quant config TensorRT-LLM reads: tensors
  (headers only), hf_quant_config.json's exclusions vs the MoE backend (C-MCFG-3), quant_cfg.json listing every FP8
  linear (C-QCFG-1, C-DSV3-1), the format loadable on a TensorRT-LLM GPU at all (C-MOE-3).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from builder.errors import CheckpointError, ConformanceError, DsbuildError
from builder.model.config import ModelConfig
from builder.model.safetensors_io import validate_checkpoint
from builder.rundir import ENGINE_CONFIG, LLM_API_FILE, QUANTIZED, RunDir
from builder.trtllm import PINNED_VERSION
from builder.trtllm.contract import check as contract_check
from builder.trtllm.llm_api import TOKENS_PER_BLOCK, fp8_excludes
from quantize import registry
from quantize.formats import mode_of_checkpoint, quantized_catalog
from quantize.w4afp8_config import quant_cfg

MODEL_YAML = "tensorrt_llm/1/model.yaml"
LAYOUT_KEYS = {"tensor_parallel_size": "tp", "pipeline_parallel_size": "pp", "moe_expert_parallel_size": "ep",
               "enable_attention_dp": "attention_dp"}


@dataclass
class Report:
    root: Path
    lines: list[str] = field(default_factory=list)  # one per disagreement
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    checked: list[str] = field(default_factory=list)  # the files read

    @property
    def ok(self) -> bool:
        return not self.lines

    def add(self, where: str, message: str) -> None:
        self.lines.append(f"{where}: {message}")

    def as_dict(self) -> dict[str, Any]:
        return {"run": str(self.root), "ok": self.ok, "disagreements": self.lines, "notes": self.notes,
                "checked": self.checked}


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _rel(report: Report, path: Path) -> str:
    try:
        return path.relative_to(report.root).as_posix()
    except ValueError:
        return str(path)


def check_run(root: str | Path, *, package_dir: str | Path | None = None, version: str = PINNED_VERSION) -> Report:
    """Check the run (or deployment) directory ``root``; ``package_dir`` stands in for ``root/package`` (the package
    stage checks its output before it is renamed into place)."""
    rd = RunDir(Path(root))
    report = Report(rd.root)
    package = Path(package_dir) if package_dir is not None else rd.package
    files = {
        "plan": rd.plan_json, "llm_api": rd.llm_api, "engine": rd.engines / ENGINE_CONFIG,
        "package": package / "package.json", "model_yaml": package / "triton_repo" / MODEL_YAML,
    }
    data: dict[str, Any] = {}
    for key, path in files.items():
        if path.is_file():
            try:
                data[key] = json.loads(path.read_text()) if path.suffix == ".json" else _load_yaml(path)
            except (ValueError, yaml.YAMLError) as exc:
                report.add(_rel(report, path), f"cannot be parsed ({type(exc).__name__})")
                continue
            report.checked.append(_rel(report, path))
        else:
            report.notes.append(f"{_rel(report, path)} is not there: not checked")
    flavour = (data.get("package") or {}).get("flavour")
    cfg = None
    if "engine" in data:
        try:
            cfg = ModelConfig.from_dict((data["engine"] or {})["model"], source=str(files["engine"]))
        except (DsbuildError, KeyError, TypeError, ValueError) as exc:
            report.add(f"engines/{ENGINE_CONFIG}", f"holds no valid model config ({type(exc).__name__}: {exc})")
    requested = _requested_layout(data.get("plan"))
    llm_api = data.get("llm_api")
    if isinstance(llm_api, dict):
        _check_llm_api(report, "engines/" + LLM_API_FILE, llm_api, cfg, version)
        if requested is not None:
            _check_plan_vs_llm_api(report, data["plan"], requested, llm_api)
    if flavour == "gpu":
        model_yaml = data.get("model_yaml")
        where = _rel(report, files["model_yaml"])
        if not isinstance(model_yaml, dict):
            report.add(where, "missing or not a mapping: the GPU flavour serves it")
        else:
            _check_model_yaml(report, where, model_yaml, llm_api, cfg, version)
            _check_launch(report, package / "launch", model_yaml, data.get("package") or {}, requested)
        _check_checkpoint(report, rd.root / QUANTIZED, llm_api, cfg)
    if requested is not None and isinstance(data.get("engine"), dict):
        _check_engine_mapping(report, data["engine"].get("mapping", {}), requested)
    return report


# ---------------------------------------------------------------------------------------------------------------
# plan <-> llm_api.yaml <-> model.yaml

def _requested_layout(plan: Any) -> dict[str, Any] | None:
    req = plan.get("requested") if isinstance(plan, dict) else None
    return req if isinstance(req, dict) and "tp" in req else None


def _check_plan_vs_llm_api(report: Report, plan: dict, req: dict, llm_api: dict) -> None:
    for key, field_name in LAYOUT_KEYS.items():
        if key in llm_api and llm_api[key] != req[field_name]:
            report.add("engines/" + LLM_API_FILE, f"{key} is {llm_api[key]!r} but plan/plan.json plans "
                       f"{field_name} {req[field_name]!r} ({req['name']})")
    moe_tp = req["tp"] // req["ep"]
    if llm_api.get("moe_tensor_parallel_size", moe_tp) != moe_tp:
        report.add("engines/" + LLM_API_FILE, f"moe_tensor_parallel_size is {llm_api['moe_tensor_parallel_size']} "
                   f"but plan/plan.json's tp {req['tp']} / ep {req['ep']} is {moe_tp}")
    planned = (plan.get("trtllm") or {}).get("moe_backend")
    backend = (llm_api.get("moe_config") or {}).get("backend")
    if planned and backend != planned:
        report.add("engines/" + LLM_API_FILE, f"moe_config.backend is {backend!r} but plan/plan.json names "
                   f"{planned!r} (it decides kv_b_proj's FP8 exclusion, docs/tensorrt-llm-contract.md#C-MCFG-3)")


def _check_llm_api(report: Report, where: str, options: dict, cfg: ModelConfig | None, version: str) -> None:
    for problem in contract_check(options, version=version):
        report.add(where, f"{problem} (TensorRT-LLM {version} contract)")
    if cfg is not None and cfg.has_indexer:
        kv = options.get("kv_cache_config") or {}
        if kv.get("tokens_per_block") != TOKENS_PER_BLOCK:
            report.add(where, f"kv_cache_config.tokens_per_block is {kv.get('tokens_per_block', 'unset (32)')} but "
                       f"DeepSeek-V3.2's DSA needs {TOKENS_PER_BLOCK} (docs/tensorrt-llm-contract.md#C-DSA-2)")
        if "enable_block_reuse" not in kv:
            report.add(where, "kv_cache_config.enable_block_reuse is not written; DSA's support for it is "
                       "version-specific (docs/tensorrt-llm-contract.md#C-DSA-3)")
    seq, tokens = options.get("max_seq_len"), options.get("max_num_tokens")
    if (not options.get("enable_chunked_prefill") and isinstance(seq, int) and isinstance(tokens, int)
            and tokens < seq - 1):
        report.add(where, f"max_num_tokens {tokens} < max_seq_len {seq} - 1 without chunked prefill: TensorRT-LLM "
                   "refuses every prompt longer than max_num_tokens (docs/tensorrt-llm-contract.md#C-LLM-1)")


def _check_model_yaml(report: Report, where: str, model_yaml: dict, llm_api: Any, cfg: ModelConfig | None,
                      version: str) -> None:
    triton = model_yaml.get("triton_config")
    if not isinstance(triton, dict) or "max_batch_size" not in triton or "decoupled" not in triton:
        report.add(where, "triton_config needs max_batch_size and decoupled (docs/tensorrt-llm-contract.md#C-TRITON-1)")
        triton = triton if isinstance(triton, dict) else {}
    options = {k: v for k, v in model_yaml.items() if k != "triton_config"}
    _check_llm_api(report, where, options, cfg, version)
    if isinstance(llm_api, dict):
        for key in sorted(set(llm_api) | set(options)):
            if key == "model":
                continue
            if llm_api.get(key) != options.get(key):
                report.add(where, f"{key} is {options.get(key)!r} but engines/{LLM_API_FILE} has {llm_api.get(key)!r}")
    for key in triton.get("deploy_relative_paths", []):
        value = _dotted(options, key)
        if not isinstance(value, str):
            report.add(where, f"triton_config.deploy_relative_paths names {key}, which model.yaml does not set")
        elif value.startswith("/"):
            report.add(where, f"{key} is the absolute path {value}: the deployment only works where it was built; "
                       "paths are relative to the deploy directory (docs/tensorrt-llm-contract.md#C-TRITON-2)")
        elif not (report.root / value).is_dir():
            report.notes.append(f"{where}: {key} {value!r} is not in this deployment; mount it there or pull "
                                "with --include-weights before serving")
    for key in ("model", "speculative_config.speculative_model"):
        value = _dotted(options, key)
        if isinstance(value, str) and not value.startswith("/") and key not in triton.get("deploy_relative_paths", []):
            report.add(where, f"{key} {value!r} is relative but not resolved under the deploy directory: "
                       "TensorRT-LLM would read it against its working directory, else as a Hub id "
                       "(docs/tensorrt-llm-contract.md#C-LLMARGS-11)")


def _dotted(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _check_engine_mapping(report: Report, mapping: dict, req: dict) -> None:
    for key in ("tp", "pp", "ep", "attention_dp"):
        if key in mapping and mapping[key] != req[key]:
            report.add("engines/" + ENGINE_CONFIG, f"mapping.{key} is {mapping[key]!r} but plan/plan.json plans "
                       f"{req[key]!r} ({req['name']})")


# ---------------------------------------------------------------------------------------------------------------
# model.yaml <-> launch files

ASSIGN = re.compile(r"^([A-Z_]+)=\"?([^\"\s]*)\"?\s*(?:#.*)?$")


def _shell_vars(text: str) -> dict[str, str]:
    return {m[1]: m[2] for line in text.splitlines() if (m := ASSIGN.match(line.strip()))}


def _sbatch(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            for tok in shlex.split(line[len("#SBATCH "):], comments=True):
                key, _, value = tok.lstrip("-").partition("=")
                out[key] = value
    return out


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_launch(report: Report, launch: Path, model_yaml: dict, package: dict, req: dict | None) -> None:
    tp, pp = model_yaml.get("tensor_parallel_size", 1), model_yaml.get("pipeline_parallel_size", 1)
    world = tp * pp if isinstance(tp, int) and isinstance(pp, int) else None
    # The plan's replica count, unless the user chose one with --replicas (package.json says so).
    replicas, source = (req.get("replicas"), f"plan/plan.json plans ({req['name']})") if req else (None, "")
    if package.get("replicas_chosen"):
        replicas, source = package.get("replicas"), "--replicas chose (package/package.json)"
    elif req and package.get("replicas") not in (None, replicas):
        report.add("package/package.json", f"replicas {package['replicas']} but plan/plan.json plans {replicas} "
                   f"({req['name']})")
    for name, parse in (("serve.sh", _launch_serve), ("slurm.sbatch", _launch_slurm), ("lws.yaml", _launch_lws)):
        path = launch / name
        if not path.is_file():
            report.notes.append(f"package/launch/{name} is not there: not checked")
            continue
        report.checked.append(f"package/launch/{name}")
        try:
            found = parse(path.read_text(encoding="utf-8"))
        except (ValueError, yaml.YAMLError, KeyError, TypeError) as exc:
            report.add(f"package/launch/{name}", f"cannot be read for its layout ({type(exc).__name__}: {exc})")
            continue
        where = f"package/launch/{name}"
        for problem in found.get("problems", []):
            report.add(where, problem)
        if world is not None and found.get("world") is not None and found["world"] != world:
            report.add(where, f"starts {found['world']} ranks per replica but model.yaml's TP {tp} x PP {pp} is "
                       f"{world} (one MPI world per replica, docs/tensorrt-llm-contract.md#C-TRITON-3)")
        if replicas is not None and found.get("replicas") is not None and found["replicas"] != replicas:
            report.add(where, f"deploys {found['replicas']} replica(s) but {source} {replicas}")
        per_node, nodes = found.get("gpus_per_node"), found.get("nodes_per_replica")
        if world is not None and per_node and nodes and per_node * nodes != world:
            report.add(where, f"{nodes} node(s) x {per_node} GPU(s) per replica is not model.yaml's world of {world}")


def _launch_serve(text: str) -> dict[str, Any]:
    v = _shell_vars(text)
    nodes = _int(v.get("NODES_PER_REPLICA", v.get("NODES")))
    return {"world": _int(v.get("WORLD_SIZE")), "replicas": _int(v.get("REPLICAS", 1)),
            "gpus_per_node": _int(v.get("GPUS_PER_NODE")), "nodes_per_replica": nodes}


def _launch_slurm(text: str) -> dict[str, Any]:
    v, s = _shell_vars(text), _sbatch(text)
    replicas = _int(v.get("REPLICAS", 1)) or 1
    slots = _int(v.get("SLOTS_PER_NODE", 1)) or 1
    total_nodes, tasks = _int(s.get("nodes")), _int(s.get("ntasks-per-node"))
    nodes = _int(v.get("NODES_PER_REPLICA")) or (total_nodes * slots // replicas if total_nodes else None)
    per_node = _int(v.get("GPUS_PER_NODE")) or (tasks // slots if tasks else None)
    world = _int(v.get("WORLD_SIZE")) or (per_node * nodes if per_node and nodes else None)
    problems = []
    if total_nodes is not None and nodes and total_nodes != -(-replicas // slots) * nodes:
        problems.append(f"#SBATCH --nodes={total_nodes} but {replicas} replica(s) of {nodes} node(s), {slots} per "
                        f"node, need {-(-replicas // slots) * nodes}")
    for key in ("ntasks-per-node", "gpus-per-node"):
        if _int(s.get(key)) is not None and per_node and _int(s.get(key)) != per_node * slots:
            problems.append(f"#SBATCH --{key}={s[key]} but {slots} replica(s) per node of {per_node} rank(s) need "
                            f"{per_node * slots}")
    return {"world": world, "replicas": replicas, "gpus_per_node": per_node, "nodes_per_replica": nodes,
            "problems": problems}


def _launch_lws(text: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    lws = next(d for d in docs if d.get("kind") == "LeaderWorkerSet")
    spec = lws["spec"]
    template = spec["leaderWorkerTemplate"]
    size = int(template.get("size", 1))
    pod = template.get("leaderTemplate") or template["workerTemplate"]
    container = pod["spec"]["containers"][0]
    gpus = _int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"))
    return {"world": gpus * size if gpus else None, "replicas": int(spec.get("replicas", 1)),
            "gpus_per_node": gpus, "nodes_per_replica": size}


# ---------------------------------------------------------------------------------------------------------------
# quantized/ <-> catalogue and quant config

def _check_checkpoint(report: Report, ckpt: Path, llm_api: Any, cfg: ModelConfig | None) -> None:
    if not (ckpt / "config.json").is_file():
        report.notes.append(f"{QUANTIZED}/ is not in this deployment: its tensors and quant config were not checked "
                            "(push/pull --include-weights carries it)")
        return
    report.checked.append(f"{QUANTIZED}/")
    try:
        ckpt_cfg = ModelConfig.from_json_file(ckpt / "config.json")
        mode = mode_of_checkpoint(ckpt)
    except (DsbuildError, OSError, ValueError) as exc:
        report.add(f"{QUANTIZED}/", f"cannot tell its format: {exc}")
        return
    if cfg is not None and ckpt_cfg.to_dict() != cfg.to_dict():
        report.add(f"{QUANTIZED}/config.json", f"differs from engines/{ENGINE_CONFIG}'s model config")
    fmt = registry.get(mode)
    if fmt.reference_engine_only:
        report.add(f"{QUANTIZED}/", f"--quant {mode} cannot load on a TensorRT-LLM GPU: {fmt.not_loadable}")
    try:
        validate_checkpoint(ckpt, expected={s.name: s for s in quantized_catalog(ckpt_cfg, mode).specs})
    except CheckpointError as exc:
        report.add(f"{QUANTIZED}/", str(exc))
    backend = ((llm_api or {}).get("moe_config") or {}).get("backend", "CUTLASS")
    hq_path = ckpt / "hf_quant_config.json"
    hq = json.loads(hq_path.read_text()).get("quantization", {}) if hq_path.is_file() else None
    if hq is not None and hq.get("quant_algo") == "FP8_BLOCK_SCALES":
        excludes = hq.get("exclude_modules")
        if excludes is not None and sorted(excludes) != sorted(fp8_excludes(backend)):
            report.add(f"{QUANTIZED}/hf_quant_config.json", f"exclude_modules {excludes} but the {backend} MoE backend "
                       f"needs {fp8_excludes(backend)} (TensorRT-LLM uses the file's list as is: "
                       "docs/tensorrt-llm-contract.md#C-MCFG-3)")
    if hq is not None and hq.get("quant_algo") == "MIXED_PRECISION":
        for line in quant_cfg_disagreements(ckpt, ckpt_cfg, hq):
            report.add(f"{QUANTIZED}/quant_cfg.json", line)


def quant_cfg_disagreements(ckpt: Path, cfg: ModelConfig, hq: dict) -> list[str]:
    """``quant_cfg.json`` against what TensorRT-LLM needs: every FP8 linear listed by its exact module name, the
    indexer's ``wk`` with the fused projection's config, one KV-cache algo (C-QCFG-1, C-DSV3-1, C-MCFG-1)."""
    path = ckpt / "quant_cfg.json"
    if not path.is_file():
        return ["missing: MIXED_PRECISION reads every layer's quant config from it (C-MCFG-1)"]
    got = json.loads(path.read_text())
    lines = []
    if got.get("kv_cache_quant_algo") not in (None, hq.get("kv_cache_quant_algo")):
        lines.append(f"kv_cache_quant_algo {got.get('kv_cache_quant_algo')!r} differs from hf_quant_config.json's "
                     f"{hq.get('kv_cache_quant_algo')!r}: TensorRT-LLM refuses to load (C-MCFG-1)")
    want = quant_cfg(cfg, got.get("kv_cache_quant_algo"))["quantized_layers"]
    layers = got.get("quantized_layers") or {}
    missing = [k for k in want if k not in layers and k.replace("kv_a_proj_with_mqa", "fused_a") not in layers]
    if missing:
        lines.append(f"{len(missing)} FP8 linear(s) not listed, e.g. {missing[0]}: TensorRT-LLM keeps an unlisted Linear "
                     "unquantized while its checkpoint bytes are FP8 (C-QCFG-1)")
    for key, value in layers.items():
        if key.endswith(".self_attn.indexer.wk"):
            fused = layers.get(key.replace("indexer.wk", "kv_a_proj_with_mqa")) or layers.get(
                key.replace("indexer.wk", "fused_a"))
            if fused != value:
                lines.append(f"{key} is {value} but the fused projection it is copied into is {fused}: the dtype "
                             "assert fails at load (C-DSV3-1)")
    return lines


def require_conformance(report: Report, *, log: Callable[[str], None] | None = None) -> None:
    """Raise ConformanceError listing every disagreement (the package stage and ``dsbuild check``)."""
    if report.ok:
        return
    if log is not None:
        for line in report.lines:
            log(line)
    raise ConformanceError(f"{len(report.lines)} disagreement(s) between the generated files, the plan and TensorRT-LLM "
                           f"{PINNED_VERSION}'s contract; first: {report.lines[0]}")


__all__ = ["ConformanceError", "Report", "check_run", "require_conformance", "quant_cfg_disagreements"]
