"""Round trips of every stored format against straightforward references and error bounds."""

from __future__ import annotations

import pytest
import torch

from quantize import fp8_block, fp8_tensor, int4, nvfp4


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_int4_group_roundtrip_error_is_at_most_half_a_step():
    w = torch.randn(256, 384, generator=g(1))
    q, s = int4.quantize(w)
    assert q.dtype == torch.int8 and s.shape == (256, 3)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    back = int4.dequantize(q, s)
    step = s.repeat_interleave(128, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    # The group's largest magnitude is exactly representable (amax / 7 * 7).
    assert torch.allclose(back.abs().view(256, 3, 128).amax(-1), w.abs().view(256, 3, 128).amax(-1), rtol=1e-6)


@pytest.mark.parametrize("along", ["in", "out"])
def test_int4_packing_matches_nibble_definition(along):
    q = torch.randint(-8, 8, (6, 8), generator=g(2), dtype=torch.int8)
    packed = int4.pack(q, along=along)
    b = packed.view(torch.uint8).to(torch.int32)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            if along == "in":  # TensorRT-LLM: byte j of row i holds inputs 2j (low) and 2j+1 (high)
                nib = (b[i, j // 2] >> (4 * (j % 2))) & 0xF
            else:  # ModelOpt: byte [i, j] holds rows 2i (low) and 2i+1 (high)
                nib = (b[i // 2, j] >> (4 * (i % 2))) & 0xF
            assert (nib - 16 if nib >= 8 else nib) == int(q[i, j])
    assert torch.equal(int4.unpack(packed, along=along), q)
    assert packed.shape == ((6, 4) if along == "in" else (3, 8))


def test_int4_refuses_inputs_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="multiple of 128"):
        int4.quantize(torch.randn(4, 130))


def naive_e2m1(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else (1 + m / 2) * 2 ** (e - 1))  # e2m1: bias 1, subnormal at e == 0


def test_nvfp4_code_table_is_e2m1():
    assert [naive_e2m1(c) for c in range(8)] == nvfp4.E2M1_VALUES.tolist()


def test_nvfp4_roundtrip_error_bounds():
    w = torch.randn(64, 256, generator=g(3))
    packed, block, gs = nvfp4.quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)
    assert block.dtype == torch.float8_e4m3fn and block.shape == (64, 16)
    assert gs.shape == () and float(gs) == pytest.approx(float(w.abs().max()) / (6 * 448))
    back = nvfp4.dequantize(packed, block, gs)
    step = (block.to(torch.float32) * gs).repeat_interleave(16, dim=1)
    # e2m1 spacing is at most 2 (between 4 and 6) in units of the block step; block scales are e4m3-rounded, so the
    # block's amax may land up to one e4m3 rounding (2^-4 relative) off.
    assert ((back - w).abs() <= step * 1.0 + w.abs() * 2 ** -4 + 1e-6).all()
    rel = float((back - w).pow(2).sum() / w.pow(2).sum())
    assert 1e-4 < rel < 0.02
    # Unpacking reproduces the codes element by element.
    codes = nvfp4.unpack_codes(packed)
    ref = torch.tensor([[naive_e2m1(int(c)) for c in row] for row in codes[:2]])
    assert torch.allclose(back[:2], ref * step[:2])


def test_fp8_per_tensor_roundtrip():
    w = torch.randn(128, 256, generator=g(4)) * 5
    q, s = fp8_tensor.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ()
    back = fp8_tensor.dequantize(q, s)
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + s * 2 ** -9).all()
    assert float(back.abs().max()) == pytest.approx(float(w.abs().max()), rel=2 ** -4)


def test_block_fp8_band_dequantization_equals_whole_tensor(tiny_ckpt):
    from quantize.stream import TensorReader

    with TensorReader(tiny_ckpt) as r:
        name = "model.layers.1.self_attn.q_b_proj.weight"  # 3072 rows: three bands of 1024
        bands = list(r.dequantized_bands(name, dtype=torch.float32, band=1024))
        assert len(bands) == 3
        whole = fp8_block.dequantize(r.read(name), r.read(r.scale_of(name)), dtype=torch.float32)
        assert torch.equal(torch.cat(bands), whole)
        kv_a = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # 192 rows: a partial edge block
        assert torch.equal(r.dequantized(kv_a), fp8_block.dequantize(r.read(kv_a), r.read(r.scale_of(kv_a)),
                                                                     dtype=torch.float32))


def test_per_expert_modules_compute_exactly_what_fused_experts_do(tiny_float_dir):
    from builder.model.hf_compat import load_hf_model
    from quantize.hf_experts import unfuse_experts

    model = load_hf_model(tiny_float_dir)
    ids = torch.randint(0, 1024, (2, 24), generator=g(5))
    with torch.no_grad():
        ref = model(ids).logits
        assert unfuse_experts(model) == 3
        got = model(ids).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    names = {n for n, _ in model.named_modules()}
    assert "model.layers.1.mlp.experts.7.down_proj" in names
