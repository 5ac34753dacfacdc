"""DeepSeek-V3/V3.2 model configuration: parsed and checked from ``config.json``, or from a built-in preset.

Only the fields that decide tensor shapes, routing and quantization are modelled; the raw dict is kept so that a
checkpoint written by dsbuild carries every key the source had.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import ModelConfigError
from builder.safeio import parse_json, read_bounded

# The config.json of a file larger than this is not a config: refuse before parsing it.
MAX_CONFIG_BYTES = 4 * 1024 * 1024

FP8_BLOCK = 128


@dataclass(frozen=True)
class QuantizationConfig:
    """DeepSeek's native ``quantization_config`` (block FP8)."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)
    scale_fmt: str | None = "ue8m0"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "quant_method": self.quant_method,
            "fmt": self.fmt,
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.weight_block_size),
        }
        if self.scale_fmt is not None:
            out["scale_fmt"] = self.scale_fmt
        return out


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    num_attention_heads: int
    num_key_value_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    num_nextn_predict_layers: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    # DSA indexer (V3.2). index_n_heads == 0 means a V3 model without the indexer.
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    tie_word_embeddings: bool = False
    model_type: str = "deepseek_v32"
    quantization: QuantizationConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_n_heads > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def kv_cache_elems_per_token_per_layer(self) -> int:
        """MLA caches the compressed latent plus the shared RoPE key: 512 + 64 = 576 for the real model."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def indexer_cache_bytes_per_token_per_layer(self) -> int:
        """DSA indexer key cache: ``index_head_dim`` FP8 values plus one fp32 scale (132 B for the real model)."""
        return self.index_head_dim + 4 if self.has_indexer else 0

    def is_moe_layer(self, layer: int) -> bool:
        """MTP layers (index >= num_hidden_layers) are MoE layers like the decoder layers after the dense ones."""
        return layer >= self.first_k_dense_replace

    @property
    def mtp_layers(self) -> list[int]:
        return [self.num_hidden_layers + i for i in range(self.num_nextn_predict_layers)]

    @property
    def is_fp8_block(self) -> bool:
        return self.quantization is not None and self.quantization.quant_method == "fp8"

    @property
    def catalog_size_bound(self) -> tuple[int, int]:
        """(tensors, parameters) the catalogue of this config holds at most, from the counts alone: checked before
        anything is allocated by them. Per layer: every linear layer with a scale and an activation scale, for
        the routed experts, the shared experts, the dense MLP, attention and the indexer, plus norms and router."""
        layers = self.num_hidden_layers + self.num_nextn_predict_layers
        experts = self.n_routed_experts + self.n_shared_experts
        tensors = layers * (3 * 3 * (experts + 1) + 64) + 8
        h, heads = self.hidden_size, self.num_attention_heads
        attention = (h * self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
                     + h * (self.kv_lora_rank + self.qk_rope_head_dim)
                     + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
                     + heads * self.v_head_dim * h
                     + self.q_lora_rank * self.index_n_heads * self.index_head_dim + h * self.index_head_dim)
        mlp = 3 * h * max(self.intermediate_size, self.moe_intermediate_size * experts) + h * self.n_routed_experts
        params = layers * (attention + mlp + 3 * h) + 2 * self.vocab_size * h * (1 + self.num_nextn_predict_layers)
        return tensors, params

    # ----- (de)serialisation -----
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ModelConfigError(f"{source} must hold a JSON object, not {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in ("deepseek_v32", "deepseek_v3"):
            raise ModelConfigError(
                f"{source} has model_type {model_type!r}; dsbuild builds deepseek_v32 (and deepseek_v3) models only"
            )
        values: dict[str, Any] = {}
        for name, kind in _REQUIRED_FIELDS.items():
            if name not in data:
                raise ModelConfigError(f"{source} is missing the required key {name!r}")
            values[name] = _coerce(data[name], kind, name, source)
        for name, (kind, default) in _OPTIONAL_FIELDS.items():
            values[name] = _coerce(data[name], kind, name, source) if data.get(name) is not None else default
        if model_type == "deepseek_v32":
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                if name not in data:
                    raise ModelConfigError(f"{source} is a deepseek_v32 config but lacks the DSA indexer key {name!r}")
                values[name] = _coerce(data[name], int, name, source)
        values["model_type"] = model_type
        values["quantization"] = _parse_quantization(data.get("quantization_config"), source)
        values["raw"] = dict(data)
        cfg = cls(**values)
        cfg.validate(source=source)
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not (path.exists() or path.is_symlink()):
            raise ModelConfigError(f"no config.json at {path}")
        raw = read_bounded(path, limit=MAX_CONFIG_BYTES, what="model config", error=ModelConfigError)
        return cls.from_dict(parse_json(raw, source=str(path), error=ModelConfigError), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` content (raw keys kept, modelled keys authoritative)."""
        out = dict(self.raw)
        for name in list(_REQUIRED_FIELDS) + list(_OPTIONAL_FIELDS):
            out[name] = getattr(self, name)
        if self.has_indexer:
            out.update(index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim, index_topk=self.index_topk)
        out["model_type"] = self.model_type
        out.setdefault("architectures", ["DeepseekV32ForCausalLM" if self.model_type == "deepseek_v32" else "DeepseekV3ForCausalLM"])
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_dict()
        else:
            out.pop("quantization_config", None)
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        return d

    # ----- checks -----
    def validate(self, *, source: str = "config.json") -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ModelConfigError(f"{source}: {msg}")

        for name in _POSITIVE:
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name, most in _LIMITS.items():
            value = getattr(self, name)
            need(value is None or value <= most, f"{name} = {value} is larger than dsbuild accepts (at most {most})")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(0 < self.rms_norm_eps < 1, f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        need(0 < self.routed_scaling_factor <= 1e4,
             f"routed_scaling_factor must be in (0, 10000], got {self.routed_scaling_factor}")
        tensors, params = self.catalog_size_bound
        need(tensors <= MAX_CATALOG_TENSORS, f"describes up to {tensors} tensors; dsbuild's catalogue holds at "
             f"most {MAX_CATALOG_TENSORS} (the real DeepSeek-V3.2 has about 92,000)")
        need(params <= MAX_CATALOG_PARAMS, f"describes up to {params:.2e} parameters; dsbuild accepts at most "
             f"{MAX_CATALOG_PARAMS:.0e} (the real DeepSeek-V3.2 has 6.9e11)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace {self.first_k_dense_replace} is outside 0..num_hidden_layers ({self.num_hidden_layers})")
        need(self.num_key_value_heads == self.num_attention_heads,
             "MLA needs num_key_value_heads == num_attention_heads "
             f"({self.num_key_value_heads} != {self.num_attention_heads})")
        need(self.n_routed_experts % self.n_group == 0,
             f"n_group {self.n_group} must divide n_routed_experts {self.n_routed_experts}")
        need(1 <= self.topk_group <= self.n_group, f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
        need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
             f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts in topk_group groups")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        if self.has_indexer:
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim {self.index_head_dim} must be >= qk_rope_head_dim {self.qk_rope_head_dim}")
            need(self.index_topk > 0, "index_topk must be positive")
        if self.quantization is not None and self.quantization.quant_method == "fp8":
            need(self.quantization.weight_block_size == (FP8_BLOCK, FP8_BLOCK),
                 f"only 128x128 FP8 weight blocks are supported, got {list(self.quantization.weight_block_size)}")


_REQUIRED_FIELDS: dict[str, type] = {
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "moe_intermediate_size": int,
    "num_hidden_layers": int,
    "first_k_dense_replace": int,
    "num_attention_heads": int,
    "q_lora_rank": int,
    "kv_lora_rank": int,
    "qk_nope_head_dim": int,
    "qk_rope_head_dim": int,
    "v_head_dim": int,
    "n_routed_experts": int,
    "num_experts_per_tok": int,
}
_OPTIONAL_FIELDS: dict[str, tuple[type, Any]] = {
    "num_key_value_heads": (int, None),
    "n_shared_experts": (int, 1),
    "n_group": (int, 1),
    "topk_group": (int, 1),
    "routed_scaling_factor": (float, 1.0),
    "norm_topk_prob": (bool, True),
    "num_nextn_predict_layers": (int, 0),
    "max_position_embeddings": (int, 4096),
    "rms_norm_eps": (float, 1e-6),
    "tie_word_embeddings": (bool, False),
}
_POSITIVE = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "num_experts_per_tok", "n_group", "max_position_embeddings",
]
# Refuse absurd values from untrusted configs before anything allocates by them: each size at most ~10-100x the
# real DeepSeek-V3.2's (in the comments), and the whole catalogue at most ~10x its tensors and ~30x its parameters.
_MAX_INT = 1 << 24
_LIMITS = {
    "vocab_size": 1 << 22,  # 129280
    "hidden_size": 1 << 16,  # 7168
    "intermediate_size": 1 << 18,  # 18432
    "moe_intermediate_size": 1 << 16,  # 2048
    "num_hidden_layers": 1024,  # 61
    "num_attention_heads": 1024,  # 128
    "num_key_value_heads": 1024,  # 128
    "q_lora_rank": 1 << 15,  # 1536
    "kv_lora_rank": 1 << 14,  # 512
    "qk_nope_head_dim": 4096,  # 128
    "qk_rope_head_dim": 4096,  # 64
    "v_head_dim": 4096,  # 128
    "n_routed_experts": 4096,  # 256
    "n_shared_experts": 64,  # 1
    "num_experts_per_tok": 4096,  # 8
    "n_group": 4096,  # 8
    "topk_group": 4096,  # 4
    "num_nextn_predict_layers": 16,  # 1
    "max_position_embeddings": 1 << 24,  # 163840
    "index_n_heads": 1024,  # 64
    "index_head_dim": 4096,  # 128
    "index_topk": 1 << 20,  # 2048
}
MAX_CATALOG_TENSORS = 1_000_000
MAX_CATALOG_PARAMS = 2 * 10**13


def _coerce(value: Any, kind: type, name: str, source: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ModelConfigError(f"{source}: {name} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelConfigError(f"{source}: {name} must be an integer, got {value!r}")
        if not -_MAX_INT < value < _MAX_INT:
            raise ModelConfigError(f"{source}: {name} = {value} is out of range")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelConfigError(f"{source}: {name} must be a finite number, got {value!r}")
        return float(value)
    raise AssertionError(kind)


def _parse_quantization(qc: Any, source: str) -> QuantizationConfig | None:
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelConfigError(f"{source}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method != "fp8":
        # ModelOpt/other exports carry their own description in hf_quant_config.json; keep the raw dict only.
        return QuantizationConfig(quant_method=str(method), fmt=str(qc.get("fmt", "")), weight_block_size=(0, 0),
                                  scale_fmt=None)
    block = qc.get("weight_block_size", [FP8_BLOCK, FP8_BLOCK])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelConfigError(f"{source}: quantization_config.weight_block_size must be two positive integers")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelConfigError(f"{source}: FP8 format {fmt!r} is not supported (only e4m3)")
    return QuantizationConfig(
        fmt=fmt,
        activation_scheme=str(qc.get("activation_scheme", "dynamic")),
        weight_block_size=(block[0], block[1]),
        scale_fmt=qc.get("scale_fmt"),
    )


# ---------------------------------------------------------------------------------------------------------------
# Presets. The real ones match the published config.json of deepseek-ai/DeepSeek-V3.2 and DeepSeek-V3.

_DEEPSEEK_V3_COMMON: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3.2": {
        **_DEEPSEEK_V3_COMMON, "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
    },
    "deepseek-v3": {**_DEEPSEEK_V3_COMMON, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]},
    # Small enough to generate in a second and run anywhere, shaped so that every TP split of 1/2/4/8 falls on whole
    # 128x128 FP8 blocks like the real model: 16 heads of q 192 / v 128, 1024-wide MLPs and experts (so that even
    # TP8 with EP1, where each expert's intermediate splits 8 ways, leaves 128 rows per rank), 8 routed experts
    # (EP 1/2/4/8), 4 layers (PP 1/2/4) of which the first is dense, and kv_a_proj_with_mqa = 128 + 64 = 192 rows,
    # a partial edge block like the real 576.
    "tiny": {
        "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
        "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 1024, "moe_intermediate_size": 1024,
        "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "num_nextn_predict_layers": 1, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "index_n_heads": 16, "index_head_dim": 128, "index_topk": 8,
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
        "rope_theta": 10000, "initializer_range": 0.02,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
        "torch_dtype": "bfloat16",
    },
}
# A draft model for speculative decoding against "tiny": the same tokenizer, width and head layout (so the same TP
# splits fall on whole FP8 blocks), 2 layers (1 dense + 1 MoE) and 4 routed experts (EP 1/2/4), no MTP.
PRESETS["tiny-draft"] = {
    **PRESETS["tiny"], "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "num_nextn_predict_layers": 0,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(_preset_data(name), source=f"preset {name}")


def _preset_data(name: str) -> dict[str, Any]:
    """A deep copy of a preset's config.json, free to change."""
    return json.loads(json.dumps(PRESETS[name]))


# Generated models: name -> (preset, trained). The trained ones are committed under builder/data/trained/
# (``dsbuild make-tiny --train`` reproduces them); the ``-random`` ones are the seeded random init.
GENERATED: dict[str, tuple[str, bool]] = {
    "tiny": ("tiny", True), "tiny-draft": ("tiny-draft", True),
    "tiny-random": ("tiny", False), "tiny-draft-random": ("tiny-draft", False),
}


def tiny_config(name: str = "tiny", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The config of a tiny preset or generated model name ('tiny-random' has the config of 'tiny')."""
    data = _preset_data(generated_model(name)[0])
    data.update(overrides or {})
    return ModelConfig.from_dict(data, source=f"preset {name}")


def generated_model(name: str) -> tuple[str, bool]:
    """``(preset, trained)`` of a generated model name: 'tiny'/'tiny-draft' are the committed trained weights,
    'tiny-random'/'tiny-draft-random' the seeded random init (a bare preset name with ``-random``)."""
    if name in GENERATED:
        return GENERATED[name]
    if name in PRESETS:
        return name, False
    raise ModelConfigError(f"unknown generated model {name!r}; choose one of {sorted(GENERATED)}")
