"""Where a model comes from: the generated tiny model, a local checkpoint directory, or a Hugging Face repo id."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import CheckpointError, ModelConfigError, SpecError, closest_choices
from builder.hub import hub_repo, read_file
from builder.model.config import GENERATED, PRESETS, ModelConfig, preset, tiny_config

# Hub ids whose config.json is known without a download (the planner must work before anything is fetched), as
# the hub spells them, with the preset that holds their config. The first of each preset is where its weights are.
KNOWN_HUB_IDS = {
    "deepseek-ai/DeepSeek-V3.2": "deepseek-v3.2",
    "deepseek-ai/DeepSeek-V3.2-Exp": "deepseek-v3.2",
    "deepseek-ai/DeepSeek-V3": "deepseek-v3",
    "deepseek-ai/DeepSeek-V3-0324": "deepseek-v3",
    "deepseek-ai/DeepSeek-R1": "deepseek-v3",
}
KNOWN_HUB_CONFIGS = {repo.lower(): name for repo, name in KNOWN_HUB_IDS.items()}
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
    raise SpecError(f"model {model!r} is neither a generated model ({', '.join(GENERATED)}), a preset "
                    f"({', '.join(sorted(p for p in PRESETS if p not in GENERATED))}), an existing directory, nor a "
                    f"hub repo id (owner/name){suggest_model(model)}", option="model")


def suggest_model(model: str) -> str:
    """Did-you-mean over the generated models, the presets and the known hub ids (also by a hub id's name alone:
    ``DeepSeek-V3.2`` -> ``deepseek-ai/DeepSeek-V3.2``); a preset is suggested as its hub checkpoint."""
    names = {**{g: g for g in GENERATED}, **{p: weights_of_preset(p) or p for p in PRESETS},
             **{repo: repo for repo in KNOWN_HUB_IDS}, **{repo.split("/")[1]: repo for repo in KNOWN_HUB_IDS}}
    if names.get(model, model) != model:  # a hub id's name alone
        chosen = [names[model]]
    else:
        chosen = [c for c in dict.fromkeys(names[n] for n in closest_choices(model, names)) if c != model]
    return f" (did you mean {' or '.join(repr(c) for c in chosen)}?)" if chosen else ""


def weights_of_preset(name: str) -> str | None:
    """The hub checkpoint whose config a preset holds (the first known hub id of it)."""
    return next((repo for repo, p in KNOWN_HUB_IDS.items() if p == name), None)


def check_has_weights(model: str) -> None:
    """A pipeline that fetches needs weights: a bare config preset has none (``dsbuild plan`` takes it)."""
    if model in PRESETS and model not in GENERATED:
        repo = weights_of_preset(model)
        where = f"--model {repo} (its checkpoint on the hub)" if repo else "a hub repo id or a local checkpoint"
        raise CheckpointError(f"model {model!r} is a built-in config preset without weights (for `dsbuild plan`); "
                              f"to fetch and build it use {where}")


@functools.lru_cache(maxsize=16)
def _cached_hub_config(repo_id: str) -> ModelConfig:
    """A hub model's config.json (only that file fetched), or the cache's copy when the hub cannot be reached."""
    return ModelConfig.from_json_file(read_file(hub_repo(repo_id), "config.json"))
