"""Which stages this host should run, decided from sizes before anything starts, and what to run on the GPU host.

plan and fetch run anywhere. quantize and build read and rewrite the whole checkpoint: on a host without a GPU they
run only when the checkpoint is small enough for it (the tiny model, a small local model); DeepSeek-V3.2's ~690 GB
would take days on a few CPU cores and more memory and disk than such a host has, so the pipeline says so up front
and stops after fetch, printing the command that finishes the job on the GPU host.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any

from builder.hub import human_bytes
from builder.model.catalog import build_catalog, total_bytes
from builder.model.source import resolve_model
from builder.specs import RunSpec
from builder.trtllm.container import CONTAINER_IMAGE, INSTALL_DSBUILD, container_text

CPU_STAGES = ("plan", "fetch", "draft-fetch")
# Bytes of checkpoint per CPU core that quantize/build get through in tolerable time (about an hour at the
# ~5 MB/s per core the fp32 reference paths manage), capped by RAM; override with the variable below.
CPU_BYTES_PER_CORE = 16 * 10**9
LIMIT_ENV = "DSBUILD_CPU_MAX_CHECKPOINT_BYTES"


@dataclass(frozen=True)
class HostFit:
    deferred: tuple[str, ...]  # stages left for the GPU host, in pipeline order
    checkpoint_bytes: int
    limit_bytes: int
    cores: int
    ram_bytes: int
    gpu: bool

    @property
    def reason(self) -> str:
        return (f"the checkpoint is {human_bytes(self.checkpoint_bytes)} and this host ({self.cores} CPU cores, "
                f"{human_bytes(self.ram_bytes)} RAM, {'a' if self.gpu else 'no'} GPU) handles at most "
                f"{human_bytes(self.limit_bytes)} in those stages (set {LIMIT_ENV} to change that)")


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no usable torch means no GPU for us
        return False


def host_fit(spec: RunSpec, stage_names: list[str]) -> HostFit:
    """What of ``stage_names`` this host leaves for a GPU host (nothing when the model is small or a GPU is here)."""
    import psutil

    size = total_bytes(build_catalog(resolve_model(spec.model).config, include_mtp=not spec.skip_mtp))
    cores = os.cpu_count() or 1
    ram = psutil.virtual_memory().total
    limit = int(os.environ.get(LIMIT_ENV) or min(ram, cores * CPU_BYTES_PER_CORE))
    deferred: tuple[str, ...] = ()
    gpu = False
    if size > limit:
        gpu = _has_gpu()
        if not gpu:
            deferred = tuple(n for n in stage_names if n not in CPU_STAGES)
    return HostFit(deferred=deferred, checkpoint_bytes=size, limit_bytes=limit, cores=cores, ram_bytes=ram, gpu=gpu)


def spec_flags(spec: RunSpec, *, overrides: dict[str, Any] | None = None) -> list[str]:
    """Command-line flags reproducing ``spec`` (only values that differ from the defaults)."""
    overrides = overrides or {}
    args: list[str] = []
    for name, field in RunSpec.model_fields.items():
        value = overrides.get(name, getattr(spec, name))
        if name not in overrides and value == field.default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for v in value:
                args += [flag, str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def gpu_host_instructions(spec: RunSpec, fit: HostFit, *, commit: str | None) -> dict[str, Any]:
    """What remains and the exact command for the GPU host (same run directory, so plan and fetch are reused)."""
    run_dir = spec.run_dir()
    overrides: dict[str, Any] = {"out": run_dir}
    if commit:
        overrides["revision"] = commit  # the exact bytes fetched here, even if the branch moves
    command = "dsbuild run " + " ".join(shlex.quote(a) for a in spec_flags(spec, overrides=overrides))
    return {
        "stages": list(fit.deferred), "reason": fit.reason, "command": command, "run_dir": str(run_dir),
        "where": f"inside {container_text()} on the GPU host, with {run_dir} copied there or on shared storage at the "
                 "same path",
        "container": CONTAINER_IMAGE, "install": INSTALL_DSBUILD,
        "checkpoint_bytes": fit.checkpoint_bytes,
    }


def instructions_text(info: dict[str, Any]) -> str:
    return (f"left for the GPU host: {', '.join(info['stages'])}, because {info['reason']}.\n"
            f"Run them {info['where']} (plan and fetch are then reported cached from its manifest.json):\n"
            f"  {info['command']}")


__all__ = ["HostFit", "host_fit", "gpu_host_instructions", "instructions_text", "spec_flags"]
