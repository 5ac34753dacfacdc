import math

import pytest
import torch

from quantize import fp8_block


def naive_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Element by element, straight from the definition W[i,j] = Wq[i,j] * S[i//128, j//128]."""
    out = torch.empty(q.shape, dtype=torch.float64)
    qf = q.to(torch.float64)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = qf[i, j] * float(s[i // block, j // block])
    return out


@pytest.mark.parametrize("shape", [(128, 128), (192, 128), (130, 257), (1, 300)])
def test_dequant_matches_definition_including_partial_edge_blocks(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * 3
    q, s = fp8_block.quantize(w)
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    ref = naive_dequant(q, s)
    got = fp8_block.dequantize(q, s, dtype=torch.float32)
    assert torch.equal(got, ref.to(torch.float32))


def test_ue8m0_scales_are_powers_of_two_and_plain_scales_are_not():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    _, s = fp8_block.quantize(w, ue8m0=True)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    _, s2 = fp8_block.quantize(w, ue8m0=False)
    assert not torch.equal(torch.log2(s2), torch.round(torch.log2(s2)))


@pytest.mark.parametrize("ue8m0", [True, False])
def test_roundtrip_error_bound(ue8m0):
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for normal values; ue8m0 loses at most 1 bit more
    # of range, not precision. Bound each element by 2^-4 * its block's amax (covers subnormal flushing too).
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(3))
    q, s = fp8_block.quantize(w, ue8m0=ue8m0)
    back = fp8_block.dequantize(q, s, dtype=torch.float32)
    amax = fp8_block.block_amax(w).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert ((back - w).abs() <= amax * 2 ** -4 + 1e-12).all()
    assert (back - w).abs().max() > 0  # it really quantized


def test_scale_grid_mismatch_is_refused():
    q, s = fp8_block.quantize(torch.randn(256, 256))
    with pytest.raises(ValueError, match="scale grid"):
        fp8_block.dequantize(q, s[:1])


def test_ue8m0_edge_blocks_match_definition_and_scales_are_powers_of_two():
    # Partial edge blocks in both dimensions with ue8m0 scales: every element checked against the definition.
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(7)) * 0.01
    q, s = fp8_block.quantize(w, ue8m0=True)
    assert s.shape == (2, 2)
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    assert torch.equal(fp8_block.dequantize(q, s, dtype=torch.float32), naive_dequant(q, s).to(torch.float32))


@pytest.mark.parametrize("ue8m0", [True, False])
def test_bf16_result_equals_float32_path_rounded(ue8m0):
    # The BF16 fast path (power-of-two scales) must be bit-identical to dequantizing in float32 and rounding.
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(8))
    q, s = fp8_block.quantize(w, ue8m0=ue8m0)
    fast = fp8_block.dequantize(q, s, dtype=torch.bfloat16)
    ref = fp8_block.dequantize(q, s, dtype=torch.float32).to(torch.bfloat16)
    assert torch.equal(fast.view(torch.int16), ref.view(torch.int16))


def elementwise_reference(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """The straightforward formula: every element's code to float32 times its block's scale, rounded to ``dtype``."""
    rows, cols = q.shape
    full = s.to(torch.float32).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (q.to(torch.float32) * full).to(dtype)


def every_code(rows: int, cols: int, seed: int) -> torch.Tensor:
    """FP8 codes covering all 256 (zeros, subnormals, the largest, both NaNs) in every block, shuffled."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.arange(rows * cols, dtype=torch.int64) % 256
    return codes[torch.randperm(rows * cols, generator=g)].to(torch.uint8).view(rows, cols).view(torch.float8_e4m3fn)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical, except that a NaN's bit pattern is not compared: torch itself rounds a float32 NaN to 0xFFFF
    in vectorised lanes and to 0x7FC0 in scalar tails, so the payload depends on the element's position."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    nan = a.isnan()
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(nan, b.isnan())
            and torch.equal(a.view(ints)[~nan], b.view(ints)[~nan]))


@pytest.mark.parametrize("shape", [(128, 128), (200, 150), (576, 384), (1, 300), (130, 33025)])
@pytest.mark.parametrize("scales", ["ue8m0", "plain", "extreme"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_table_dequantization_is_bit_identical_to_elementwise_reference(shape, scales, dtype):
    # All 256 codes (NaN, +-0, subnormals) under ue8m0 (power-of-two), arbitrary and overflowing/underflowing scales,
    # partial edge blocks in both dimensions, and a width over 256 column blocks (32-bit lookup indices).
    rows, cols = shape
    q = every_code(rows, cols, seed=rows + cols)
    g = torch.Generator().manual_seed(cols)
    grid = (math.ceil(rows / 128), math.ceil(cols / 128))
    if scales == "ue8m0":
        s = torch.pow(2.0, torch.randint(-20, 5, grid, generator=g).float())
    elif scales == "plain":
        s = torch.rand(grid, generator=g) * 1e-3 + 1e-6
    else:
        s = torch.pow(2.0, torch.randint(-140, 125, grid, generator=g).float()) * (1 + torch.rand(grid, generator=g))
    assert same_bits(fp8_block.dequantize(q, s, dtype=dtype), elementwise_reference(q, s, dtype))


def test_bf16_output_equals_the_former_bf16_multiply_for_ue8m0_scales():
    # Before the table lookup, power-of-two scales were applied by a BF16 multiply; outputs must not change.
    q = every_code(384, 520, seed=9)
    s = torch.pow(2.0, torch.randint(-12, -6, (3, 5), generator=torch.Generator().manual_seed(9)).float())
    former = (q.to(torch.bfloat16) * s.to(torch.bfloat16).repeat_interleave(128, 0)[:384]
              .repeat_interleave(128, 1)[:, :520]).to(torch.bfloat16)
    assert same_bits(fp8_block.dequantize(q, s, dtype=torch.bfloat16), former)
