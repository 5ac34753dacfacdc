"""The allow-list of LLM-API keys and value types per pinned TensorRT-LLM version
(``builder/data/trtllm/<version>/llm_args_keys.yaml``, source named in the file), and a checker for rendered
configurations: every key must be allowed and every value of the allowed type."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from builder.errors import PackageError

DATA = Path(__file__).resolve().parent.parent / "data" / "trtllm"


@functools.lru_cache(maxsize=None)
def allow_list(version: str) -> dict[str, Any]:
    path = DATA / version / "llm_args_keys.yaml"
    if not path.is_file():
        known = sorted(p.name for p in DATA.iterdir() if p.is_dir()) if DATA.is_dir() else []
        raise PackageError(f"no TensorRT-LLM key allow-list for version {version!r} (have: {', '.join(known)})")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list[int]":
        return isinstance(value, list) and all(_type_ok("int", v) for v in value)
    if kind.startswith("enum[") or kind.startswith("literal["):
        return isinstance(value, str) and value in kind[kind.index("[") + 1: -1].split("|")
    raise AssertionError(f"unknown type {kind!r} in the allow-list")


def check(config: dict[str, Any], *, version: str) -> list[str]:
    """Problems with ``config`` against the allow-list and the cross-field rules TensorRT-LLM's validators enforce
    (empty: it conforms)."""
    allowed = allow_list(version)
    return _check_block(config, allowed["top_level"], allowed, "") + _check_rules(config)


def _check_rules(config: dict[str, Any]) -> list[str]:
    problems = []
    graphs = config.get("cuda_graph_config")
    if isinstance(graphs, dict) and graphs.get("batch_sizes") and graphs.get("max_batch_size"):
        # TensorRT-LLM then demands batch_sizes == its own generated list (docs/tensorrt-llm-contract.md#C-LLMARGS-5).
        problems.append("cuda_graph_config: batch_sizes and a non-zero max_batch_size together are refused unless "
                        "batch_sizes equals TensorRT-LLM's generated list; give one of them")
    speculative = config.get("speculative_config")
    if isinstance(speculative, dict) and speculative.get("decoding_type") == "DraftTarget":
        if not speculative.get("max_draft_len") or not speculative.get("speculative_model"):
            problems.append("speculative_config: DraftTarget needs max_draft_len > 0 and speculative_model "
                            "(docs/tensorrt-llm-contract.md#C-LLMARGS-8)")
    return problems


def _check_block(block: Any, fields: dict[str, str], allowed: dict[str, Any], where: str) -> list[str]:
    if not isinstance(block, dict):
        return [f"{where or 'config'} must be a mapping"]
    problems = []
    for key, value in block.items():
        path = f"{where}{key}"
        kind = fields.get(key)
        if kind is None:
            problems.append(f"{path}: not a TensorRT-LLM {allowed['version']} LLM-API key")
        elif value is None:
            continue
        elif kind.startswith("model:"):
            problems += _check_block(value, allowed["models"][kind[6:]], allowed, path + ".")
        elif kind.startswith("union:"):
            disc = allowed["discriminators"][key]
            choices = {allowed["models"][m][disc][len("literal["):-1]: m for m in kind[6:].split("|")}
            model = choices.get(value.get(disc)) if isinstance(value, dict) else None
            if model is None:
                problems.append(f"{path}.{disc}: must be one of {sorted(choices)}")
            else:
                problems += _check_block(value, allowed["models"][model], allowed, path + ".")
        elif not _type_ok(kind, value):
            problems.append(f"{path}: {value!r} is not of type {kind}")
    return problems


def require_conforming(config: dict[str, Any], *, version: str) -> None:
    problems = check(config, version=version)
    if problems:
        raise PackageError(f"the rendered TensorRT-LLM config breaks the {version} contract: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
