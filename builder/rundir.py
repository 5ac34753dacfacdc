"""The layout of a run directory (``build/<run>/``): the one owner of every path inside it.

Stages write their outputs under the directory names below; the CLI, the reference engine's ``verify``, the
benchmark's prediction, packaging and publishing find files through :class:`RunDir`, never by spelling a path.

```
<run>/
  manifest.json          every stage's key, inputs, outputs (size, sha256), written after each stage completes
  .dsbuild-complete/     <stage>.json: the stage's completion record (key, output digest, sizes, mtimes), last
  plan/                  plan.json, plan.png
  weights/               the fetched checkpoint (HF layout, verified)
  quantized/             the checkpoint in the --quant format (what TensorRT-LLM loads)
  draft-weights/         --spec draft: the draft model, fetched
  draft-quantized/       --spec draft: the draft model in the run's format (TensorRT-LLM's speculative_model)
  engines/               config.json, rank{N}.safetensors, llm_api.yaml, tokenizer files; draft/ (the draft's bundle)
  package/               triton_repo/, launch/, package.json
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LOCK = ".dsbuild.lock"
STAGE_RECORDS = ".dsbuild-complete"  # <stage>.json: written last when a stage completes (builder/pipeline.py)
LATEST = "latest"  # <parent>/latest -> the most recent complete run

# Stage output directories.
PLAN = "plan"
WEIGHTS = "weights"
QUANTIZED = "quantized"
DRAFT_WEIGHTS = "draft-weights"
DRAFT_QUANTIZED = "draft-quantized"
ENGINES = "engines"
PACKAGE = "package"

# Inside engines/.
ENGINE_CONFIG = "config.json"
LLM_API_FILE = "llm_api.yaml"
DRAFT_BUNDLE = "draft"  # the draft model's one-rank reference-engine bundle, under engines/

# Inside package/.
TRITON_REPO = "triton_repo"
LAUNCH = "launch"
PACKAGE_JSON = "package.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of_engines(cls, engines: str | Path) -> "RunDir":
        """The run an ``engines/`` directory belongs to (its parent)."""
        return cls(Path(engines).resolve().parent)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def plan_json(self) -> Path:
        return self.root / PLAN / "plan.json"

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS

    @property
    def quantized(self) -> Path:
        return self.root / QUANTIZED

    @property
    def draft_quantized(self) -> Path:
        return self.root / DRAFT_QUANTIZED

    @property
    def engines(self) -> Path:
        return self.root / ENGINES

    @property
    def llm_api(self) -> Path:
        return self.engines / LLM_API_FILE

    @property
    def draft_bundle(self) -> Path:
        return self.engines / DRAFT_BUNDLE

    @property
    def package(self) -> Path:
        return self.root / PACKAGE

    @property
    def triton_repo(self) -> Path:
        return self.package / TRITON_REPO

    @property
    def launch(self) -> Path:
        return self.package / LAUNCH
