"""Synthetic run directories for the publish tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from builder.model.config import preset


def synthetic_run(root: Path, *, write_manifest: bool = False) -> dict:
    """A run directory with plan/, engines/ and a package/ (Triton repository, launch script, Dockerfile) as the
    package stage lays it out; returns its manifest (also written to root/manifest.json when asked)."""
    files = {"plan/plan.json": b'{"layout": "tp2pp1"}', "engines/rank0.safetensors": os.urandom(3000),
             "engines/config.json": json.dumps({"model": preset("tiny").to_dict()}).encode(), "package/triton_repo/tensorrt_llm/config.pbtxt": b'name: "x"',
             "package/triton_repo/tensorrt_llm/1/model.yaml": b"a: 1", "package/launch/run.sh": b"#!/bin/sh\n",
             "package/Dockerfile": b"FROM nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3\n"}
    stages = {}
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        stage = {"plan": "plan", "engines": "build", "package": "package"}[path.split("/")[0]]
        entry = stages.setdefault(stage, {"dir": path.split("/")[0], "key": stage * 4, "outputs": [],
                                          "completed_at": "2026-11-28T10:00:00+00:00"})
        entry["outputs"].append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    (root / "package/launch/run.sh").chmod(0o755)
    manifest = {"dsbuild_version": "0.1.0", "run_name": "r", "stages": stages,
                "spec": {"model": "deepseek-ai/DeepSeek-V3.2", "quant": "fp8", "tp": 2, "pp": 1, "ep": 1,
                         "gpu": "h200-sxm"}}
    if write_manifest:
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
