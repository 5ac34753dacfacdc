"""Where a model comes from: the generated tiny model, a local checkpoint directory, or a Hugging Face repo id."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download

from builder.errors import ModelConfigError, SpecError
from builder.hub import call_with_retries, hub_error, hub_repo
from builder.model.config import PRESETS, ModelConfig, preset
from builder.model.tiny import GENERATED, tiny_config

# Hub ids whose config.json is known without a download (the planner must work before anything is fetched).
KNOWN_HUB_CONFIGS = {
    "deepseek-ai/deepseek-v3.2": "deepseek-v3.2",
    "deepseek-ai/deepseek-v3.2-exp": "deepseek-v3.2",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
    "deepseek-ai/deepseek-v3-0324": "deepseek-v3",
    "deepseek-ai/deepseek-r1": "deepseek-v3",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "generated" | "local" | "hub" | "preset"
    ref: str  # preset name, absolute path, or repo id
    config: ModelConfig


def resolve_model(model: str) -> ModelSource:
    """Identify ``model`` and load its config without downloading weights."""
    if model in GENERATED:
        return ModelSource("generated", model, tiny_config(model))
    if model in PRESETS:
        return ModelSource("preset", model, preset(model))
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")):
        if not path.is_dir():
            raise SpecError(f"model path {model} is not a directory")
        if not (path / "config.json").is_file():
            raise ModelConfigError(f"model directory {model} has no config.json")
        return ModelSource("local", str(path.resolve()), ModelConfig.from_json_file(path / "config.json"))
    if REPO_ID.match(model):
        known = KNOWN_HUB_CONFIGS.get(model.lower())
        config = preset(known) if known else _cached_hub_config(model)
        return ModelSource("hub", model, config)
    raise SpecError(f"model {model!r} is neither 'tiny', a preset ({', '.join(sorted(PRESETS))}), "
                    "an existing directory, nor a hub repo id (owner/name)")


@functools.lru_cache(maxsize=16)
def _cached_hub_config(repo_id: str) -> ModelConfig:
    """A hub model's config.json from the local HF cache, fetched (config only) if the hub is reachable."""
    try:
        path = call_with_retries(lambda: hf_hub_download(repo_id, "config.json"))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one sentence naming the repo
        raise hub_error(hub_repo(repo_id), exc, what=f"read config.json of {repo_id}") from None
    return ModelConfig.from_json_file(path)
