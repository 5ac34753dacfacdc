"""The generated tiny checkpoint has exactly DeepSeek-V3.2's layout and loads into transformers."""

import json
import re

import torch

from builder.model.catalog import Dtype, Kind, build_catalog, catalog_by_name
from builder.model.config import ModelConfig
from builder.model.safetensors_io import read_header, read_index, validate_checkpoint
from builder.model.tiny import make_tiny


def test_layout_matches_the_real_model(tiny_ckpt):
    cfg = ModelConfig.from_json_file(tiny_ckpt / "config.json")
    assert cfg.model_type == "deepseek_v32"
    assert json.loads((tiny_ckpt / "config.json").read_text())["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "scale_fmt": "ue8m0"}
    shards = sorted(p.name for p in tiny_ckpt.glob("*.safetensors"))
    assert len(shards) >= 4
    assert all(re.fullmatch(r"model-\d{5}-of-\d{6}\.safetensors", s) for s in shards)
    # The index maps every tensor to exactly the shard that holds it, and every shard tensor is indexed.
    layout = validate_checkpoint(tiny_ckpt, expected=catalog_by_name(cfg))
    on_disk = {n for s in shards for n in read_header(tiny_ckpt / s).tensors}
    assert on_disk == set(read_index(tiny_ckpt / "model.safetensors.index.json").weight_map)
    # Indexer and MTP module present under their real names.
    names = set(layout.index.weight_map)
    mtp = cfg.num_hidden_layers
    for n in [f"model.layers.0.self_attn.indexer.wq_b.weight", f"model.layers.{mtp}.eh_proj.weight",
              f"model.layers.{mtp}.shared_head.head.weight", f"model.layers.{mtp}.mlp.experts.0.up_proj.weight"]:
        assert n in names, n
    # FP8 weights carry float32 block scales; at least one dimension is not a multiple of 128.
    kv_a = layout.tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert kv_a.dtype is Dtype.F8_E4M3 and kv_a.shape[0] % 128 != 0
    assert layout.tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").shape == (2, 1)
    assert layout.tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv").dtype is Dtype.F32
    total = sum(p.stat().st_size for p in tiny_ckpt.iterdir())
    assert total < 40e6


def test_tokenizer_is_byte_level_and_encodes_anything(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    text = "Grüße, 世界! 🙂 \x00 tabs\tand\nnewlines"
    ids = tok.encode(text).ids
    assert max(ids) < 1024 and tok.decode(ids) == text
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1


def test_generation_is_deterministic_and_seed_dependent(tmp_path, cache_dir):
    from builder.model.generated import ensure_tiny

    random_ckpt = ensure_tiny(cache_dir / "models", seed=0, preset_name="tiny-random")
    a = make_tiny(tmp_path / "a", seed=0)
    b = make_tiny(tmp_path / "b", seed=1)
    for f in sorted(p.name for p in random_ckpt.iterdir()):
        assert (a / f).read_bytes() == (random_ckpt / f).read_bytes(), f
    assert (b / "model-00002-of-000007.safetensors").read_bytes() != (a / "model-00002-of-000007.safetensors").read_bytes()


def test_dequantized_checkpoint_loads_into_transformers_with_finite_logits(tiny_float_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(tiny_float_dir), dtype=torch.float32,
                                                       attn_implementation="eager", output_loading_info=True)
    assert type(model).__name__ == "DeepseekV32ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, 1024) and torch.isfinite(logits).all() and logits.std() > 0.1


def test_catalog_of_the_real_model():
    from builder.model.config import preset

    cfg = preset("deepseek-v3.2")
    specs = build_catalog(cfg)
    by = {s.name: s for s in specs}
    assert by["model.layers.0.self_attn.q_b_proj.weight"].shape == (128 * 192, 1536)
    assert by["model.layers.0.self_attn.kv_b_proj.weight"].shape == (128 * 256, 512)
    assert by["model.layers.0.self_attn.o_proj.weight"].shape == (7168, 128 * 128)
    assert by["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)
    assert "model.layers.61.eh_proj.weight" in by and "model.layers.62.eh_proj.weight" not in by
    params = sum(s.numel for s in specs if not s.is_scale)
    main = sum(s.numel for s in specs if not s.is_scale and (s.layer is None or s.layer < 61))
    assert 670e9 < main < 672e9  # 671B main-model parameters
    assert 13e9 < params - main < 16e9  # ~14B MTP (with its own embedding and head copies)
    assert sum(1 for s in specs if s.kind is Kind.EXPERT_UP and not s.is_scale) == 256 * 59
