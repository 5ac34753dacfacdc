"""The streaming machinery under the quantize modes: the direct-I/O sequential writer, the ordered look-ahead that
computes pieces on worker threads, and the safetensors shards written through both (read back by the safetensors
library itself, an independent parser)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from builder.errors import CheckpointError
from builder.model.catalog import Dtype
from quantize import seqwrite
from quantize.seqwrite import SequentialWriter
from quantize.stream import ahead, computed, write_checkpoint


def payload(n: int, seed: int) -> bytes:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("sizes", [[0], [1], [4096], [8192 * 3 + 5], [100, 70000, 3, 65536, 1 << 16, 12345]])
def test_sequential_writer_writes_exactly_the_bytes_given(tmp_path, direct, sizes):
    # Small blocks so that writes straddle blocks and the aligned O_DIRECT tail must be cut back.
    parts = [payload(n, i) for i, n in enumerate(sizes)]
    path = tmp_path / "out.bin"
    with SequentialWriter(path, block_bytes=8192, direct=direct) as w:
        for p in parts:
            w.write(p)
    assert path.read_bytes() == b"".join(parts)


def test_sequential_writer_uses_direct_io_where_the_filesystem_allows(tmp_path):
    with SequentialWriter(tmp_path / "d.bin", block_bytes=8192) as w:
        w.write(payload(20000, 1))
        expected_direct = bool(seqwrite.O_DIRECT) and w.direct
    if seqwrite.O_DIRECT and not expected_direct:
        pytest.skip(f"{tmp_path} refuses O_DIRECT (tmpfs?): the buffered fallback was used, as intended")
    assert (tmp_path / "d.bin").read_bytes() == payload(20000, 1)


def test_sequential_writer_reports_a_write_error_and_abort_leaves_no_thread(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = os.write

    def failing(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(seqwrite.os, "write", failing)
    w = SequentialWriter(tmp_path / "e.bin", block_bytes=4096, direct=False)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(20):
            w.write(b"x" * 4096)
        w.close()
    w.abort()
    assert not any(t.name == "dsbuild-writer" and t.is_alive() for t in threading.enumerate())


def test_ahead_keeps_order_and_overlaps_work():
    def slow(i):
        def run():
            time.sleep(0.02 * (i % 3))
            return i
        return run
    items = [slow(i) if i % 2 else i for i in range(20)]  # functions and plain values mixed
    t = time.perf_counter()
    assert list(ahead(items, workers=2, depth=4)) == list(range(20))
    assert time.perf_counter() - t < 0.02 * sum(i % 3 for i in range(1, 20, 2))  # two threads overlapped


def test_ahead_raises_in_order_and_bounds_its_look_ahead():
    started = []

    def task(i):
        def run():
            started.append(i)
            if i == 3:
                raise ValueError("piece 3 is bad")
            return i
        return run
    it = ahead((task(i) for i in range(100)), workers=2, depth=4)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="piece 3"):
        next(it)
    assert max(started) <= 3 + 4 + 1  # never ran far ahead of the consumer


def test_checkpoint_written_from_parallel_pieces_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    b = torch.randint(-100, 100, (1000,), dtype=torch.int8, generator=g)
    c = torch.randn(3, generator=g)
    entries = [
        computed("a", Dtype.BF16, a.shape, lambda: ((lambda r=r: a[r:r + 64]) for r in range(0, 300, 64))),
        computed("b", Dtype.I8, b.shape, lambda: [b.view(torch.uint8)[:10], lambda: b.view(torch.uint8)[10:]]),
        computed("c", Dtype.F32, c.shape, lambda: [c]),
    ]
    weight_map = write_checkpoint(tmp_path, [entries])
    got = load_file(tmp_path / weight_map["a"])
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and torch.equal(got["c"], c)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_piece_of_the_wrong_size_leaves_no_shard(tmp_path):
    entries = [computed("a", Dtype.F32, (4,), lambda: [lambda: torch.zeros(3)])]
    with pytest.raises(CheckpointError, match="produced 12 bytes, planned 16"):
        write_checkpoint(tmp_path, [entries])
    assert list(tmp_path.iterdir()) == []


def test_direct_writes_refused_after_open_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    real = os.write
    refused = {"n": 0}

    def refuse_direct(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & seqwrite.O_DIRECT:
            refused["n"] += 1
            raise OSError(22, "Invalid argument")
        return real(fd, data)
    monkeypatch.setattr(seqwrite.os, "write", refuse_direct)
    data = payload(30000, 4)
    with SequentialWriter(tmp_path / "f.bin", block_bytes=8192) as w:
        w.write(data)
        opened_direct = w.direct or refused["n"] > 0
    if not opened_direct:
        pytest.skip("O_DIRECT unavailable here: nothing to fall back from")
    assert refused["n"] == 1 and not w.direct
    assert (tmp_path / "f.bin").read_bytes() == data


def test_filesystems_refusing_direct_io_at_open_get_buffered_writes(tmp_path, monkeypatch):
    # Older kernels' tmpfs and some network filesystems refuse O_DIRECT in open() with EINVAL.
    real = os.open

    def refuse_direct(path, flags, *args):
        if flags & seqwrite.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args)
    monkeypatch.setattr(seqwrite.os, "open", refuse_direct)
    data = payload(10000, 5)
    with SequentialWriter(tmp_path / "t.bin", block_bytes=8192) as w:
        w.write(data)
    assert not w.direct
    assert (tmp_path / "t.bin").read_bytes() == data


def test_pieces_flow_across_shards_without_mixing_them(tmp_path):
    # One look-ahead pipeline spans all shards: each piece must still land in its own shard, in order, including
    # a zero-size tensor that produces no piece at all.
    import json

    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": torch.randn(37 * (i + 1), 5, generator=g) for i in range(6)}
    tensors["empty"] = torch.zeros(0, 5)

    def planned(name):
        t = tensors[name]
        return computed(name, Dtype.F32, t.shape, lambda: ((lambda r=r: t[r:r + 16]) for r in range(0, len(t), 16)))
    shards = [[planned("t0"), planned("empty"), planned("t1")], [], [planned("t2")], [planned(f"t{i}") for i in (3, 4, 5)]]
    weight_map = write_checkpoint(tmp_path, shards)
    assert sorted(set(weight_map.values())) == [f"model-0000{i}-of-000003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    for name, t in tensors.items():
        assert torch.equal(load_file(tmp_path / weight_map[name])[name], t), name


@pytest.mark.parametrize("where", [None, "last byte", "first byte of the second piece", "last byte of the first piece"])
def test_fp8_verification_finds_a_nan_code_anywhere_in_a_multi_piece_weight(tmp_path, where):
    # A weight larger than one verification piece (16 MB), checked in 1 MB scratch slices on worker threads: a NaN
    # code (0x7F or 0xFF) at either side of every boundary must be found, and named.
    from builder.errors import QuantizationError
    from quantize.modes import VERIFY_PIECE, verify_block_fp8
    from quantize.stream import TensorReader

    rows, cols = 4224, 4096  # 17.3 MB: two pieces
    codes = torch.randint(0, 0x7F, (rows * cols,), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    codes[1::2] |= 0x80  # negative values too; no NaN yet
    at = {"last byte": rows * cols - 1, "first byte of the second piece": VERIFY_PIECE,
          "last byte of the first piece": VERIFY_PIECE - 1}.get(where)
    if at is not None:
        codes[at] = 0xFF if at % 2 else 0x7F
    scale = torch.full((rows // 128, cols // 128), 2.0 ** -8)
    name = "model.layers.0.mlp.down_proj.weight"
    write_checkpoint(tmp_path, [[computed(name, Dtype.F8_E4M3, (rows, cols), lambda: [codes]),
                                 computed(name + "_scale_inv", Dtype.F32, scale.shape, lambda: [scale])]])
    with TensorReader(tmp_path) as reader:
        if at is None:
            assert verify_block_fp8(reader) == {"fp8_weights_checked": 1}
        else:
            with pytest.raises(QuantizationError, match=f"block-FP8 weight '{name}' holds NaN values"):
                verify_block_fp8(reader)


@pytest.mark.parametrize("bad", ["nan in b", "scale of c", "both"])
def test_fp8_verification_of_weights_read_together_names_the_first_bad_one(tmp_path, bad):
    # Small weights of one shard are read and checked in one piece; the problem reported is still the first one in
    # file order, with the right tensor's name.
    from builder.errors import QuantizationError
    from quantize.modes import verify_block_fp8
    from quantize.stream import TensorReader

    g = torch.Generator().manual_seed(7)
    entries = []
    for w in "abc":
        codes = torch.randint(0, 0x7F, (256, 384), dtype=torch.uint8, generator=g)
        scale = torch.full((2, 3), 2.0 ** -6)
        if w == "b" and bad in ("nan in b", "both"):
            codes[255, 383] = 0xFF
        if w == "c" and bad in ("scale of c", "both"):
            scale[1, 2] = float("inf")
        name = f"model.layers.0.mlp.{w}.weight"
        entries += [computed(name, Dtype.F8_E4M3, codes.shape, lambda c=codes: [c]),
                    # raw bytes: the writer refuses to compute an infinite scale, a damaged source may hold one
                    computed(name + "_scale_inv", Dtype.F32, scale.shape, lambda s=scale: [s.view(torch.uint8)])]
    write_checkpoint(tmp_path, [entries])
    want = ("block-FP8 weight 'model.layers.0.mlp.b.weight' holds NaN values" if bad != "scale of c" else
            "'model.layers.0.mlp.c.weight_scale_inv' holds non-finite or non-positive scales")
    with TensorReader(tmp_path) as reader, pytest.raises(QuantizationError) as err:
        verify_block_fp8(reader)
    assert str(err.value) == want


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_the_writer_refuses_computed_non_finite_values_naming_the_tensor(tmp_path, value):
    # Issue 18 item 6: what quantize computes (a dequantized band, a scale) is checked as it is written.
    from builder.errors import QuantizationError

    band = torch.ones(4, 8, dtype=torch.bfloat16)
    band[3, 7] = value
    entries = [computed("a.weight", Dtype.BF16, (8, 8), lambda: [torch.ones(4, 8, dtype=torch.bfloat16), band])]
    with pytest.raises(QuantizationError, match="non-finite values .* for 'a.weight'"):
        write_checkpoint(tmp_path, [entries])
    assert not list(tmp_path.iterdir())
