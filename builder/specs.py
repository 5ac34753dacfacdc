"""Typed specs: the one source of truth for every option.

Each field of :class:`RunSpec` declares its type, default, help text and the stages whose output it affects. The CLI
derives its flags from these fields (``builder.cli``), the pipeline derives each stage's cache key from the fields
that affect it, and values come, in rising precedence, from the defaults, ``--config FILE.yaml``, ``DSBUILD_<NAME>``
environment variables, and command-line flags.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from builder.errors import SpecError, did_you_mean
from builder.layout import Layout
from builder.safeio import parse_yaml, read_bounded
from builder.plan.hardware import GPUS, NETWORKS
from quantize import registry as quant_formats

QuantMode = Literal[quant_formats.NAMES]  # type: ignore[valid-type]
SpecMode = Literal["none", "mtp", "draft"]

MAX_CONFIG_FILE_BYTES = 1 << 20

# Context rules for values that cannot be quoted where they land (issue 18 item 9).
SLURM_TIME = re.compile(r"^(UNLIMITED|INFINITE|[0-9]{1,9}(:[0-9]{1,2}){0,2}|[0-9]{1,5}-[0-9]{1,2}(:[0-9]{1,2}){0,2})$")
SLURM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.,+-]{0,127}$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@#+-]{0,254}$")
PATH_VALUE = re.compile(r"^[^\x00-\x1f\x7f]{1,4096}$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
DEFAULT_KUBECTL_IMAGE = "bitnami/kubectl:1.30"
RULES = {
    "run_name": (RUN_NAME, "letters, digits, '.', '_' or '-' (the run directory's name names files, Slurm jobs and "
                 "Kubernetes objects)"),
    "slurm_time": (SLURM_TIME, "a Slurm time limit such as 04:00:00, 2-00:00:00 or UNLIMITED"),
    "slurm_partition": (SLURM_NAME, "a Slurm partition name (letters, digits, _ . , + -)"),
    "slurm_account": (SLURM_NAME, "a Slurm account name (letters, digits, _ . , + -)"),
    "k8s_pvc": (DNS_SUBDOMAIN, "a Kubernetes object name (lower-case DNS-1123 subdomain)"),
    "k8s_namespace": (DNS_LABEL, "a Kubernetes namespace (lower-case DNS-1123 label)"),
    "image": (IMAGE, "a container image reference without spaces or quotes"),
    "k8s_kubectl_image": (IMAGE, "a container image reference without spaces or quotes"),
    "model_path": (PATH_VALUE, "a path without control characters (newlines, tabs)"),
}


def value_problem(field: str, value: str | None) -> str | None:
    """Why ``value`` cannot land where ``field`` goes (None: it can)."""
    pattern, rule = RULES[field]
    if value is None or (isinstance(value, str) and pattern.fullmatch(value)):
        return None
    return f"it must be {rule}"


def check_value(field: str, value: str | None) -> str | None:
    """``value`` if it is valid for where ``field`` lands, else SpecError naming the field and the rule."""
    problem = value_problem(field, value)
    if problem:
        raise SpecError(f"invalid {field.replace('_', '-')} {value!r}: {problem}")
    return value


class CrossFieldError(ValueError):
    """A rule between several options; ``fields`` lets the error name where each of their values came from."""

    def __init__(self, message: str, *, fields: tuple[str, ...]):
        super().__init__(message)
        self.fields = fields


ALL_STAGES = "*"
# The pipeline's stages in order, as the fields below name them (``builder.stages`` adds the draft model's fetch and
# quantize, keyed by these fields of fetch and quantize); a stage command runs its stage and those before it.
STAGE_ORDER = ("plan", "fetch", "quantize", "build", "package")


def opt(default: Any, help: str, *, stages: tuple[str, ...] = (), used: tuple[str, ...] = (), **kw: Any) -> Any:
    """A spec field: ``stages`` are the stages whose output depends on it (their cache keys include it); ``used``
    the stages that read it without it changing their output (where, how fast, whether to refuse; ``ALL_STAGES``:
    every one). Together they decide which commands take the option (``fields_for``)."""
    return Field(default, description=help, json_schema_extra={"stages": list(stages), "used": list(used)}, **kw)


def fields_for(stages: tuple[str, ...], *, keyed_only: bool = False) -> tuple[str, ...]:
    """The RunSpec fields that a run of ``stages`` reads (``keyed_only``: only those in their keys), in
    declaration order."""
    out = []
    for name, f in RunSpec.model_fields.items():
        extra = f.json_schema_extra or {}
        touches = set(extra.get("stages", [])) | (set() if keyed_only else set(extra.get("used", [])))
        if touches & set(stages) or (not keyed_only and ALL_STAGES in touches):
            out.append(name)
    return tuple(out)


_PER_DEVICE = "Default: as measured for the device the bundle is for (builder/data/fusion/defaults.yaml)."


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # Where each value that is not a default came from ("command-line flag --tp", ...), for error messages.
    _origin: dict[str, str] = PrivateAttr(default_factory=dict)

    # --- model and source ---
    model: str = opt("tiny", "Model: 'tiny' (trained, built in), 'tiny-draft', 'tiny-random', a Hugging Face repo id, "
                     "or a local checkpoint directory.",
                     stages=("plan", "fetch"))
    # Not a key field itself: fetch resolves it to a commit sha, and that sha is in fetch's key (and so downstream).
    revision: str = opt("main", "Hub revision (branch, tag or commit); resolved to a commit sha first.",
                        used=("fetch",))
    seed: int = opt(0, "Seed of the generated random-init models (tiny-random, tiny-draft-random).", stages=("fetch",))
    include: list[str] = opt([], "Glob patterns of repository files to fetch (repeatable).", stages=("fetch",))
    exclude: list[str] = opt([], "Glob patterns of repository files not to fetch (repeatable).", stages=("fetch",))
    skip_mtp: bool = opt(False, "Drop the MTP module's tensors (only when no MTP speculative decoding is planned).",
                         stages=("plan", "fetch"))
    fetch_workers: int = opt(8, "Parallel download workers.", used=("fetch",), ge=1, le=64)
    trust_remote_code: bool = opt(False, "Let TensorRT-LLM run a checkpoint's own Python code (llm_api.yaml's "
                                         "trust_remote_code; off unless asked for).", stages=("build",))

    # --- layout and cluster ---
    tp: int = opt(2, "Tensor-parallel size.", stages=("plan", "build", "package"), ge=1, le=1024)
    pp: int = opt(2, "Pipeline-parallel size.", stages=("plan", "build", "package"), ge=1, le=1024)
    ep: int = opt(1, "Expert-parallel size for routed experts (divides TP).", stages=("plan", "build", "package"),
                  ge=1, le=1024)
    attention_dp: bool = opt(False, "Attention data parallelism (replicated attention, requests split over ranks).",
                             stages=("plan", "build", "package"))
    gpu: str | None = opt(None, "Target GPU: " + ", ".join(g for g in GPUS if GPUS[g].arch != "cpu") + " (or one a "
                          "--hardware-file adds); none means a CPU-only build.",
                          stages=("plan", "quantize", "build", "package"))
    nodes: int = opt(1, "Number of nodes.", stages=("plan", "package"), ge=1, le=4096)
    gpus_per_node: int | None = opt(None, "GPUs per node (default: the GPU table's, usually 8).",
                                    stages=("plan", "package"), ge=1, le=64)
    network: str = opt("ib-ndr", "Scale-out network between nodes: " + ", ".join(NETWORKS) + " (or one a "
                       "--hardware-file adds).",
                       stages=("plan",))
    hardware_file: Path | None = opt(None, "YAML file overriding the built-in GPU/network table.", stages=("plan",),
                                     used=("quantize",))
    # Not part of any stage key: it only decides whether the plan stage refuses, which it checks on every run.
    allow_infeasible: bool = opt(False, "Build the requested layout even when the planner finds it infeasible "
                                        "(it still records why in plan/plan.json); only where the later stages "
                                        "can build it.", used=("plan",))

    # --- quantization ---
    quant: QuantMode = opt("fp8", "Weight format: " + ", ".join(quant_formats.NAMES) + ".",
                           stages=("plan", "quantize", "build", "package"))
    kv_cache_dtype: Literal["auto", "fp8", "bf16"] = opt("fp8", "KV-cache dtype.",
                                                          stages=("plan", "quantize", "build", "package"))
    act_scales: Path | None = opt(None, "w4afp8: a safetensors file of the routed experts' w{1,2,3}.input_scale, made "
                                  "on a GPU node by the script dsbuild prints for the full model; replaces calibration.",
                                  stages=("quantize",))
    calib_size: int = opt(16, "Calibration prompts (formats that calibrate).", stages=("quantize",), ge=1, le=4096)
    calib_seq_len: int = opt(64, "Tokens per calibration prompt.", stages=("quantize",), ge=8, le=1 << 20)

    # --- workload (plan, build limits) ---
    isl: int = opt(1024, "Mean input length in tokens.", stages=("plan", "build", "package"), ge=1, le=1 << 22)
    osl: int = opt(1024, "Mean output length in tokens.", stages=("plan", "build", "package"), ge=1, le=1 << 22)
    concurrency: int = opt(64, "Target concurrent sequences.", stages=("plan", "build", "package"), ge=1, le=1 << 20)
    stream_interval: int = opt(1, "Streamed responses every N generated tokens (TensorRT-LLM's stream_interval): "
                               "fewer, larger responses for clients that take several tokens per response; dsbuild "
                               "bench's gRPC/HTTP token count needs 1.", stages=("build",), ge=1, le=1024)
    chunked_prefill: bool = opt(False, "TensorRT-LLM chunked prefill: max_num_tokens becomes a per-iteration budget "
                                "instead of the longest prompt served (docs/tensorrt-llm-contract.md#C-LLM-2).",
                                stages=("plan", "build", "package"))
    ttft_ms: float | None = opt(None, "Time-to-first-token limit (ms).", stages=("plan",), gt=0)
    tpot_ms: float | None = opt(None, "Time-per-output-token limit (ms).", stages=("plan",), gt=0)

    # --- speculative decoding ---
    spec: SpecMode = opt("none", "Speculative decoding: none, mtp (DeepSeek's own MTP module) or draft (a draft model).",
                         stages=("plan", "build", "package"))
    draft_len: int = opt(3, "Draft tokens per step.", stages=("plan", "build", "package"), ge=1, le=16)
    # Also offered wherever --spec is: --spec draft is refused without it.
    draft_model: str | None = opt(None, "Draft model for --spec draft ('tiny-draft', hub id or directory).",
                                  stages=("build", "package"), used=("plan",))

    # --- package (Triton repository and launch files) ---
    flavour: Literal["auto", "gpu", "cpu"] = opt(
        "auto", "Triton repository flavour: gpu (TensorRT-LLM container), cpu (reference engine), auto (gpu when "
        "--gpu is given).", stages=("package",))
    image: str | None = opt(None, "Container image for launch files (default: the pinned TensorRT-LLM's Triton image).",
                            stages=("package",))
    replicas: int | None = opt(None, "Model replicas the launch files deploy (default: as many as --nodes x "
                               "--gpus-per-node hold, the plan's count).", stages=("package",), ge=1, le=100000)
    model_path: str | None = opt(None, "Checkpoint the GPU servers load, relative to the deploy directory or absolute "
                                 "(default: quantized).",
                                 stages=("package",))
    slurm_partition: str | None = opt(None, "Slurm partition for slurm.sbatch.", stages=("package",))
    slurm_account: str | None = opt(None, "Slurm account for slurm.sbatch.", stages=("package",))
    slurm_time: str = opt("04:00:00", "Slurm time limit for slurm.sbatch.", stages=("package",))
    k8s_pvc: str = opt("dsbuild-run", "ReadWriteMany PVC whose root is the deploy directory, for lws.yaml.",
                       stages=("package",))
    k8s_namespace: str | None = opt(None, "Kubernetes namespace for lws.yaml.", stages=("package",))
    k8s_kubectl_image: str = opt(DEFAULT_KUBECTL_IMAGE, "Image the multi-node lws.yaml copies kubectl from (its "
                                 "launcher starts remote ranks with kubectl exec).", stages=("package",))
    openai_port: int | None = opt(None, "Port of the OpenAI-compatible endpoint the GPU launch files start beside "
                                  "Triton (serve.sh/slurm.sbatch also take OPENAI_PORT at launch).",
                                  stages=("package",), ge=1, le=65535)
    # --- build-time kernel fusion (each one switchable and measured by benchmarks/bench_engine.py; unset: the
    # measured default of the device the bundle is built for, builder/data/fusion/defaults.yaml) ---
    fuse_gate_up: bool | None = opt(None, "Fuse each MLP/expert gate_proj and up_proj into one GEMM (gate_up_proj). "
                                    + _PER_DEVICE, stages=("build",))
    fuse_qkv_a: bool | None = opt(None, "Fuse q_a_proj, kv_a_proj_with_mqa and the indexer's wk into one GEMM "
                                  "(fused_a). " + _PER_DEVICE, stages=("build",))
    absorb_mla: bool | None = opt(None, "MLA weight absorption: decode attends in the kv_lora + rope latent space. "
                                  + _PER_DEVICE, stages=("build",))
    stack_experts: bool | None = opt(None, "Stack each rank's routed experts into 3-D tensors for one batched GEMM. "
                                     + _PER_DEVICE, stages=("build",))
    kv_cache_free_fraction: float = opt(0.9, "TensorRT-LLM kv_cache_config.free_gpu_memory_fraction.",
                                        stages=("build", "package"), gt=0, le=1)

    # --- where ---
    out: Path | None = opt(None, "Run directory (default: build/<model>-<quant>-<layout>).", used=(ALL_STAGES,))
    cache_dir: Path | None = opt(None, "Cache for generated models (default ~/.cache/dsbuild) and hub downloads "
                                 "(<cache-dir>/huggingface/hub; default HF_HUB_CACHE).", used=(ALL_STAGES,))

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model must not be empty")
        return v

    @field_validator("slurm_time", "slurm_partition", "slurm_account", "k8s_pvc", "k8s_namespace", "image",
                     "k8s_kubectl_image", "model_path")
    @classmethod
    def _launch_values(cls, v: str | None, info) -> str | None:
        """Values that land in launch files are checked for their context (no shell, YAML or directive injection)."""
        problem = value_problem(info.field_name, v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("gpu")
    @classmethod
    def _gpu_lower(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunSpec":
        if self.ep > self.tp or self.tp % self.ep:
            raise CrossFieldError(f"EP {self.ep} must divide TP {self.tp}", fields=("ep", "tp"))
        if self.spec == "draft" and not self.draft_model:
            raise CrossFieldError("--spec draft needs --draft-model", fields=("spec",))
        if self.spec == "mtp" and self.skip_mtp:
            raise CrossFieldError("--spec mtp needs the MTP module; drop --skip-mtp", fields=("spec", "skip_mtp"))
        return self

    # --- derived ---
    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsbuild"

    def model_slug(self) -> str:
        base = self.model.rstrip("/").split("/")[-1] if self.model != "tiny" else "tiny"
        return re.sub(r"[^A-Za-z0-9._-]+", "-", base).lower()

    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tp, pp=self.pp, ep=self.ep, attention_dp=self.attention_dp)

    def run_name(self) -> str:
        spec = "" if self.spec == "none" else f"-{self.spec}{self.draft_len}"
        return f"{self.model_slug()}-{self.quant}-{self.layout.name}{spec}"

    def run_dir(self, root: Path = Path("build")) -> Path:
        return Path(self.out) if self.out else root / self.run_name()

    def origin_of(self, name: str) -> str | None:
        """Where the value of option ``name`` came from, in words; None for a default."""
        return self._origin.get(name)

    def stage_fields(self, stage: str) -> dict[str, Any]:
        """The values that affect ``stage``'s output (part of its cache key)."""
        out = {}
        for name, field in type(self).model_fields.items():
            if stage in (field.json_schema_extra or {}).get("stages", []):
                value = getattr(self, name)
                out[name] = str(value) if isinstance(value, Path) else value
        return out


def env_values(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``DSBUILD_<FIELD>`` variables (list fields: comma-separated)."""
    environ = dict(os.environ if environ is None else environ)
    out: dict[str, Any] = {}
    for name, field in RunSpec.model_fields.items():
        key = f"DSBUILD_{name.upper()}"
        if key in environ and environ[key] != "":
            raw = environ[key]
            out[name] = [p for p in raw.split(",") if p] if field.annotation == list[str] else raw
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    raw = read_bounded(path, limit=MAX_CONFIG_FILE_BYTES, what="config file", error=SpecError)
    data = parse_yaml(raw, source=f"config file {path}", error=SpecError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"config file {path} must be a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_spec(*, cli: dict[str, Any] | None = None, config_file: str | Path | None = None,
                 environ: dict[str, str] | None = None) -> RunSpec:
    """Defaults < config file < environment < command line. Raises SpecError naming the first bad value and where
    it came from (the flag, the ``DSBUILD_`` variable, or the config file and key)."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if config_file:
        from_file = load_config_file(config_file)
        merged.update(from_file)
        origin.update({k: f"key {k} in config file {config_file}" for k in from_file})
    from_env = env_values(environ)
    merged.update(from_env)
    origin.update({k: f"environment variable DSBUILD_{k.upper()}={_env_raw(k, environ)!r}" for k in from_env})
    from_cli = {k: v for k, v in (cli or {}).items() if v is not None}
    merged.update(from_cli)
    origin.update({k: "the command line" for k in from_cli})
    try:
        spec = RunSpec(**merged)
    except ValidationError as exc:
        raise SpecError(_one_sentence(exc, origin)) from None
    spec._origin = origin
    return spec


def _env_raw(name: str, environ: dict[str, str] | None) -> str:
    return (os.environ if environ is None else environ).get(f"DSBUILD_{name.upper()}", "")


def _one_sentence(exc: ValidationError, origin: dict[str, str] | None = None) -> str:
    origin = origin or {}
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "options"
    name = str(err["loc"][0]) if err.get("loc") else ""
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    where = f" (from {origin[name]})" if name in origin else ""
    if err.get("type") == "extra_forbidden":
        return f"unknown option {loc!r}{_did_you_mean(name)}{where}"
    if err.get("type") == "literal_error":
        return f"invalid value {err.get('input')!r} for {loc.replace('_', '-')}: {msg}{where}"
    if loc != "options":
        return f"invalid {loc.replace('_', '-')}: {msg}{where}"
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, CrossFieldError):
        sources = [f"{f.replace('_', '-')} from {origin[f]}" if f in origin else
                   f"{f.replace('_', '-')} is the default {RunSpec.model_fields[f].default!r}" for f in cause.fields]
        return f"{msg} ({'; '.join(sources)})"
    return msg


def _did_you_mean(name: str) -> str:
    return did_you_mean(name.replace("-", "_"), RunSpec.model_fields)
