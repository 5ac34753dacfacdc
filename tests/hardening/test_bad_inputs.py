"""The bad-input catalogue: one table of things users point dsbuild at by mistake, each with its exact outcome.

Every case damages a copy of the tiny checkpoint (or passes a bad option / reference), runs the real CLI, and checks
the exit code (builder/errors.py), a substring of the one-sentence error naming the problem, that stderr has no
traceback, that the source directory is unchanged, and that nothing was left outside the stage's temporary directory:
no ``.tmp-`` leftovers, no directory for the failing stage, and every output the manifest lists exists with its size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.hardening import record

RUN = "build/r"


# --- damaging a checkpoint -------------------------------------------------------------------------------------

def _shards(ck: Path) -> list[Path]:
    return sorted(ck.glob("model-*.safetensors"))


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _edit_header(ck: Path, fn: Callable[[dict], None], shard: int = 0) -> None:
    path = _shards(ck)[shard]
    header, data = _read(path)
    fn(header)
    _write(path, header, data)


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit_config(ck: Path, fn: Callable[[dict], None]) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    fn(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))


def _edit_index(ck: Path, fn: Callable[[dict], None]) -> None:
    idx = json.loads((ck / "model.safetensors.index.json").read_text())
    fn(idx)
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))


def _poke(ck: Path, *, dtype: str, suffix: str, value: bytes) -> str:
    """Overwrite the first element of the first tensor of ``dtype`` whose name ends with ``suffix``."""
    for path in _shards(ck):
        header, data = _read(path)
        for name in _tensors(header):
            if header[name]["dtype"] == dtype and name.endswith(suffix):
                start = header[name]["data_offsets"][0]
                data = data[:start] + value + data[start + len(value):]
                _write(path, header, data)
                return name
    raise AssertionError(f"no {dtype} tensor ending {suffix}")


def pop_key(key):
    return lambda ck, tmp: _edit_config(ck, lambda c: c.pop(key))


def set_key(key, value):
    return lambda ck, tmp: _edit_config(ck, lambda c: c.__setitem__(key, value))


def truncate(ck, tmp):
    p = _shards(ck)[1]
    p.write_bytes(p.read_bytes()[:-1000])


def header_too_long(ck, tmp):
    p = _shards(ck)[0]
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])


def header_not_json(ck, tmp):
    p = _shards(ck)[0]
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    p.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])


def overlap(ck, tmp):
    def fn(h):
        a, b = _tensors(h)[:2]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
    _edit_header(ck, fn, shard=1)


def out_of_file(ck, tmp):
    def fn(h):
        last = _tensors(h)[-1]
        s, e = h[last]["data_offsets"]
        h[last]["data_offsets"] = [s + 4096, e + 4096]
    _edit_header(ck, fn)


def bad_dtype(dtype):
    def damage(ck, tmp):
        _edit_header(ck, lambda h: h[_tensors(h)[0]].__setitem__("dtype", dtype))
    return damage


def wrong_shape(ck, tmp):
    def fn(h):
        name = _tensors(h)[0]
        shape = h[name]["shape"]
        h[name]["shape"] = [shape[0] * 2, *shape[1:]]
    _edit_header(ck, fn)


def index_missing_shard(ck, tmp):
    def fn(idx):
        name = next(iter(idx["weight_map"]))
        idx["weight_map"][name] = "model-00009-of-000009.safetensors"
    _edit_index(ck, fn)


def index_tensor_twice(ck, tmp):
    raw = (ck / "model.safetensors.index.json").read_text()
    idx = json.loads(raw)
    name, shard = next(iter(idx["weight_map"].items()))
    other = next(s for s in idx["weight_map"].values() if s != shard)
    body = json.dumps(idx)
    dup = f'"weight_map": {{{json.dumps(name)}: {json.dumps(other)}, '
    (ck / "model.safetensors.index.json").write_text(body.replace('"weight_map": {', dup, 1))


def index_unsafe(path):
    def damage(ck, tmp):
        def fn(idx):
            name = next(iter(idx["weight_map"]))
            idx["weight_map"][name] = path
        _edit_index(ck, fn)
    return damage


def index_drops_tensor(ck, tmp):
    _edit_index(ck, lambda idx: idx["weight_map"].pop(next(iter(idx["weight_map"]))))


def index_not_json(ck, tmp):
    (ck / "model.safetensors.index.json").write_text('{"weight_map": ')


def remove(name):
    return lambda ck, tmp: (ck / name).unlink()


def remove_shard(ck, tmp):
    _shards(ck)[3].unlink()


def nan_fp8(ck, tmp):
    _poke(ck, dtype="F8_E4M3", suffix="mlp.down_proj.weight", value=b"\x7f")


def inf_scale(ck, tmp):
    _poke(ck, dtype="F32", suffix="weight_scale_inv", value=struct.pack("<f", float("inf")))


def nan_scale(ck, tmp):
    _poke(ck, dtype="F32", suffix="weight_scale_inv", value=struct.pack("<f", float("nan")))


def negative_scale(ck, tmp):
    _poke(ck, dtype="F32", suffix="weight_scale_inv", value=struct.pack("<f", -1.0))


def trailing_bytes(n):
    def damage(ck, tmp):
        p = _shards(ck)[2]
        p.write_bytes(p.read_bytes() + b"\0" * n)
    return damage


def gap(*, at_start: bool, n: int = 8):
    """``n`` unowned bytes before the first tensor, or between the first and second (later offsets shifted)."""
    def damage(ck, tmp):
        path = _shards(ck)[1]
        header, data = _read(path)
        names = _tensors(header)
        cut = 0 if at_start else header[names[0]]["data_offsets"][1]
        for name in names:
            if header[name]["data_offsets"][0] >= cut:
                header[name]["data_offsets"] = [o + n for o in header[name]["data_offsets"]]
        _write(path, header, data[:cut] + b"\0" * n + data[cut:])
    return damage


def raw_config(fn: Callable[[str], str]):
    """Edit config.json as text (what json.dumps cannot write: huge literals, NaN, deep nesting)."""
    def damage(ck, tmp):
        (ck / "config.json").write_text(fn((ck / "config.json").read_text()))
    return damage


def set_raw(key: str, literal: str):
    return raw_config(lambda text: re.sub(rf'"{key}": [^,}}]+', f'"{key}": {literal}', text, count=1))


def nested_key(depth: int):
    return raw_config(lambda text: text.rstrip().rstrip("}") + ', "junk": ' + "[" * depth + "]" * depth + "}")


def poke_f32(suffix: str, value: float):
    return lambda ck, tmp: _poke(ck, dtype="F32", suffix=suffix, value=struct.pack("<f", value))


def poke_bf16(suffix: str, value: bytes):
    return lambda ck, tmp: _poke(ck, dtype="BF16", suffix=suffix, value=value)


def huge_scale(ck, tmp):
    """Every scale of one FP8 weight 3e38: finite, positive, but weight x scale overflows BF16."""
    for path in _shards(ck):
        header, data = _read(path)
        for name in _tensors(header):
            if name.endswith("mlp.down_proj.weight_scale_inv") and header[name]["dtype"] == "F32":
                s, e = header[name]["data_offsets"]
                data = data[:s] + struct.pack("<f", 3e38) * ((e - s) // 4) + data[e:]
                _write(path, header, data)
                return
    raise AssertionError("no down_proj scale")


def text_file(name: str, text: str):
    return lambda ck, tmp: (tmp / name).write_text(text)


def directory(name: str):
    return lambda ck, tmp: (tmp / name).mkdir()


def fifo(name: str):
    return lambda ck, tmp: os.mkfifo(tmp / name)


def symlink_to(name: str, target: str):
    return lambda ck, tmp: (tmp / name).symlink_to(target)


def bad_yaml(ck, tmp):
    (tmp / "bad.yaml").write_text("tp: [2\nquant: fp8\n")


def yaml_unknown_key(ck, tmp):
    (tmp / "bad.yaml").write_text("tensor_parallel: 2\n")


@dataclass
class Case:
    id: str
    args: list[str]
    exit_code: int
    message: str
    damage: Callable[[Path, Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    failing_dir: str | None = None  # the stage directory that must not exist afterwards
    item: int | None = None  # the class of issue 18 it belongs to (docs/hardening.md groups by it)


MODEL = ["run", "--model", "ck", "--out", RUN]
CASES = [
    Case("config-missing-hidden_size", MODEL, 3, "config.json is missing the required key 'hidden_size'", pop_key("hidden_size"), failing_dir="plan"),
    Case("config-missing-num_hidden_layers", MODEL, 3, "'num_hidden_layers'", pop_key("num_hidden_layers"), failing_dir="plan"),
    Case("config-missing-n_routed_experts", MODEL, 3, "'n_routed_experts'", pop_key("n_routed_experts"), failing_dir="plan"),
    Case("config-hidden_size-string", MODEL, 3, "hidden_size must be an integer, got 'big'", set_key("hidden_size", "big"), failing_dir="plan"),
    Case("config-negative-heads", MODEL, 3, "num_attention_heads must be positive, got -16", set_key("num_attention_heads", -16), failing_dir="plan"),
    Case("config-not-json", MODEL, 3, "config.json is not valid JSON", lambda ck, tmp: (ck / "config.json").write_text("{oops"), failing_dir="plan"),
    Case("config-is-a-list", MODEL, 3, "config.json must hold a JSON object, not list", lambda ck, tmp: (ck / "config.json").write_text("[1, 2]"), failing_dir="plan"),
    Case("config-missing", MODEL, 3, "model directory ck has no config.json", remove("config.json"), failing_dir="plan"),
    Case("config-contradicts-intermediate", MODEL, 3, "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [1024, 128] but config.json implies [2048, 128]", set_key("intermediate_size", 2048), failing_dir="weights"),
    Case("config-contradicts-vocab", MODEL, 3, "tensor 'model.embed_tokens.weight' has shape [1024, 128] but config.json implies [4096, 128]", set_key("vocab_size", 4096), failing_dir="weights"),
    Case("config-more-layers-than-tensors", MODEL, 3, "checkpoint lacks tensor 'model.layers.5.", set_key("num_hidden_layers", 6), failing_dir="weights"),
    Case("safetensors-truncated", MODEL, 3, "model-00002-of-000007.safetensors: tensor data ends at byte 1903056 but the file holds only 1902056 data bytes", truncate, failing_dir="weights"),
    Case("safetensors-header-length-past-eof", MODEL, 3, "model-00001-of-000007.safetensors declares a 1099511627776-byte header, over the 104857600-byte limit", header_too_long, failing_dir="weights"),
    Case("safetensors-header-not-json", MODEL, 3, "model-00001-of-000007.safetensors is not valid JSON", header_not_json, failing_dir="weights"),
    Case("safetensors-overlapping-offsets", MODEL, 3, "tensor 'model.layers.0.mlp.gate_proj.weight_scale_inv' overlaps the tensor before it", overlap, failing_dir="weights"),
    Case("safetensors-offsets-past-eof", MODEL, 3, "model-00001-of-000007.safetensors: tensor data ends at byte 266240 but the file holds only 262144 data bytes", out_of_file, failing_dir="weights"),
    Case("safetensors-dtype-unknown", MODEL, 3, "tensor 'model.embed_tokens.weight' has dtype 'Q3', which dsbuild does not accept", bad_dtype("Q3"), failing_dir="weights"),
    Case("safetensors-dtype-f64", MODEL, 3, "tensor 'model.embed_tokens.weight' has dtype 'F64', which dsbuild does not accept", bad_dtype("F64"), failing_dir="weights"),
    Case("safetensors-shape-vs-config", MODEL, 3, "tensor 'model.embed_tokens.weight' spans 262144 bytes but BF16 x [2048, 128] needs 524288", wrong_shape, failing_dir="weights"),
    Case("fp8-nan-code", MODEL, 6, "block-FP8 weight 'model.layers.0.mlp.down_proj.weight' holds NaN values", nan_fp8, failing_dir="quantized"),
    Case("scale-inf", MODEL, 3, "tensor 'model.layers.0.mlp.down_proj.weight_scale_inv' (F32, in model-00002-of-000007.safetensors) holds non-finite values", inf_scale, failing_dir="weights", item=6),
    Case("scale-nan", MODEL, 3, "tensor 'model.layers.0.mlp.down_proj.weight_scale_inv' (F32, in model-00002-of-000007.safetensors) holds non-finite values", nan_scale, failing_dir="weights", item=6),
    Case("scale-negative", MODEL, 6, "'model.layers.0.mlp.down_proj.weight_scale_inv' holds non-finite or non-positive scales", negative_scale, failing_dir="quantized"),
    Case("index-missing-shard", MODEL, 3, "names shard 'model-00009-of-000009.safetensors', which is not among the checkpoint's files", index_missing_shard, failing_dir="weights"),
    Case("index-tensor-twice", MODEL, 3, "model.safetensors.index.json names 'lm_head.weight' twice", index_tensor_twice, failing_dir="weights"),
    Case("index-dotdot-path", MODEL, 3, "'../../etc/passwd': it would escape the target", index_unsafe("../../etc/passwd"), failing_dir="weights"),
    Case("index-absolute-path", MODEL, 3, "'/etc/passwd': it would escape the target", index_unsafe("/etc/passwd"), failing_dir="weights"),
    Case("index-not-json", MODEL, 3, "model.safetensors.index.json is not valid JSON", index_not_json, failing_dir="weights"),
    Case("index-drops-a-tensor", MODEL, 3, "model-00007-of-000007.safetensors holds 'lm_head.weight', which model.safetensors.index.json does not name", index_drops_tensor, failing_dir="weights"),
    Case("shard-file-missing", MODEL, 3, "names shard 'model-00004-of-000007.safetensors', which is not among the checkpoint's files", remove_shard, failing_dir="weights"),
    # Issue 18 item 4: fetch checks that every data byte of a shard belongs to exactly one tensor.
    Case("safetensors-trailing-bytes", MODEL, 3, "model-00003-of-000007.safetensors: 4096 trailing bytes after the last tensor belong to no tensor", trailing_bytes(4096), failing_dir="weights", item=4),
    Case("safetensors-one-trailing-byte", MODEL, 3, "1 trailing bytes after the last tensor", trailing_bytes(1), failing_dir="weights", item=4),
    Case("safetensors-gap-between-tensors", MODEL, 3, "model-00002-of-000007.safetensors: 8 bytes at data offset", gap(at_start=False), failing_dir="weights", item=4),
    Case("safetensors-gap-before-first-tensor", MODEL, 3, "64 bytes at data offset 0 belong to no tensor", gap(at_start=True, n=64), failing_dir="weights", item=4),
    # Item 5: config.json values bounded before anything is built; huge literals and deep nesting read safely.
    Case("config-5000-digit-integer", MODEL, 3, "is refused: an integer of 5000 digits", set_raw("hidden_size", "9" * 5000), failing_dir="plan", item=5),
    Case("config-nested-200000-deep", MODEL, 3, "is refused: it nests too deeply", nested_key(200_000), failing_dir="plan", item=5),
    Case("config-nested-100-deep", MODEL, 3, "is refused: it nests deeper than 64 levels", nested_key(100), failing_dir="plan", item=5),
    Case("config-16M-layers", MODEL, 3, "num_hidden_layers = 16000000 is larger than dsbuild accepts (at most 1024)", set_key("num_hidden_layers", 16_000_000), failing_dir="plan", item=5),
    Case("config-catalogue-too-large", MODEL, 3, "tensors; dsbuild's catalogue holds at most 1000000", lambda ck, tmp: _edit_config(ck, lambda c: c.update(num_hidden_layers=1000, n_routed_experts=4096, n_group=4096, topk_group=1)), failing_dir="plan", item=5),
    Case("config-vocab-8M", MODEL, 3, "vocab_size = 8388608 is larger than dsbuild accepts", set_key("vocab_size", 1 << 23), failing_dir="plan", item=5),
    Case("config-nan-literal", MODEL, 3, "is refused: NaN, which is not JSON", set_raw("rms_norm_eps", "NaN"), failing_dir="plan", item=5),
    Case("config-infinity-literal", MODEL, 3, "is refused: -Infinity, which is not JSON", set_raw("routed_scaling_factor", "-Infinity"), failing_dir="plan", item=5),
    Case("config-1e999", MODEL, 3, "is refused: the number 1e999 is too large to be finite", set_raw("routed_scaling_factor", "1e999"), failing_dir="plan", item=5),
    Case("yaml-5000-digit-integer", ["run", "--config", "bad.yaml", "--out", RUN], 2, "config file bad.yaml is refused: an integer of 5000 digits", text_file("bad.yaml", "tp: " + "7" * 5000 + "\n"), item=5),
    Case("yaml-nested-100000-deep", ["run", "--config", "bad.yaml", "--out", RUN], 2, "config file bad.yaml is refused: it nests too deeply", text_file("bad.yaml", "include: " + "[" * 100_000 + "]" * 100_000 + "\n"), item=5),
    Case("yaml-ttft-infinite", ["run", "--config", "bad.yaml", "--out", RUN], 2, "config file bad.yaml is refused: the value '.inf' is not a finite number", text_file("bad.yaml", "ttft_ms: .inf\n"), item=5),
    Case("env-ttft-nan", ["run", "--out", RUN], 2, "invalid ttft-ms: Input should be a finite number", env={"DSBUILD_TTFT_MS": "nan"}, item=5),
    # Item 6: non-finite weights refused naming the tensor, at the first stage that can know.
    Case("bf16-inf", MODEL, 3, "tensor 'model.layers.0.input_layernorm.weight' (BF16, in model-00002-of-000007.safetensors) holds non-finite values", poke_bf16("input_layernorm.weight", b"\x80\x7f"), failing_dir="weights", item=6),
    Case("bf16-nan", MODEL, 3, "tensor 'model.embed_tokens.weight' (BF16, in model-00001-of-000007.safetensors) holds non-finite values", poke_bf16("embed_tokens.weight", b"\xc0\x7f"), failing_dir="weights", item=6),
    Case("f32-router-bias-minus-inf", MODEL, 3, "e_score_correction_bias' (F32, in", poke_f32("e_score_correction_bias", float("-inf")), failing_dir="weights", item=6),
    Case("fp8-scale-3e38-to-bf16", [*MODEL, "--quant", "bf16"], 6, "quantize computed non-finite values (NaN or infinity) for 'model.layers.0.mlp.down_proj.weight'", huge_scale, failing_dir="quantized", item=6),
    # Items 10 and 11: --config / --hardware-file read at most their limit, whatever the path is; hardware numbers
    # finite and positive.
    Case("config-file-is-a-directory", ["run", "--config", "cfgdir", "--out", RUN], 2, "config file cfgdir is a directory, not a regular file", directory("cfgdir"), item=10),
    Case("config-file-is-dev-zero", ["run", "--config", "/dev/zero", "--out", RUN], 2, "config file /dev/zero is a character device, not a regular file", item=10),
    Case("config-file-is-a-fifo", ["run", "--config", "pipe", "--out", RUN], 2, "config file pipe is a named pipe, not a regular file", fifo("pipe"), item=10),
    Case("config-file-links-to-dev-zero", ["run", "--config", "z.yaml", "--out", RUN], 2, "config file z.yaml is a character device", symlink_to("z.yaml", "/dev/zero"), item=10),
    Case("config-file-over-1MiB", ["run", "--config", "big.yaml", "--out", RUN], 2, "config file big.yaml is larger than 1048576 bytes", text_file("big.yaml", "# " + "x" * (1 << 20) + "\n"), item=10),
    Case("hardware-file-is-dev-zero", ["run", "--hardware-file", "/dev/zero", "--out", RUN], 2, "hardware file /dev/zero is a character device, not a regular file", item=10),
    Case("hardware-file-is-a-directory", ["run", "--hardware-file", "hwdir", "--out", RUN], 2, "hardware file hwdir is a directory, not a regular file", directory("hwdir"), item=10),
    Case("hardware-file-is-a-fifo", ["run", "--hardware-file", "pipe", "--out", RUN], 2, "hardware file pipe is a named pipe", fifo("pipe"), item=10),
    Case("hardware-hbm-zero", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "hardware file hw.yaml: gpus.h200-sxm.hbm_tb_s: Input should be greater than 0", text_file("hw.yaml", "gpus: {h200-sxm: {hbm_tb_s: 0}}\n"), item=11),
    Case("hardware-hbm-nan", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "hardware file hw.yaml is refused: the value '.nan' is not a finite number", text_file("hw.yaml", "gpus: {h200-sxm: {hbm_tb_s: .nan}}\n"), item=11),
    Case("hardware-tflops-inf", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "hardware file hw.yaml is refused: the value '.inf' is not a finite number", text_file("hw.yaml", "gpus: {h200-sxm: {bf16_tflops: .inf}}\n"), item=11),
    Case("hardware-tflops-1e999-string", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "gpus.h200-sxm.bf16_tflops: Input should be a finite number", text_file("hw.yaml", "gpus: {h200-sxm: {bf16_tflops: '1e999'}}\n"), item=11),
    Case("hardware-network-negative", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "networks.ib-ndr.gb_s: Input should be greater than 0", text_file("hw.yaml", "networks: {ib-ndr: {gb_s: -50}}\n"), item=11),
    Case("hardware-memory-1e300", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "gpus.h200-sxm.memory_gib: Input should be less than or equal to 1000000000000000", text_file("hw.yaml", "gpus: {h200-sxm: {memory_gib: 1.0e+300}}\n"), item=11),
    Case("hardware-gpus-per-node-zero", ["run", "--gpu", "h200-sxm", "--hardware-file", "hw.yaml", "--out", RUN], 2, "gpus.h200-sxm.gpus_per_node: Input should be greater than or equal to 1", text_file("hw.yaml", "gpus: {h200-sxm: {gpus_per_node: 0}}\n"), item=11),
    Case("nvfp4-on-h200", ["run", "--quant", "nvfp4", "--gpu", "h200-sxm", "--out", RUN], 2, "nvfp4 needs Blackwell GPUs (b200, gb200); h200-sxm is hopper"),
    # A later stage would refuse it whatever the flag says, so the plan refuses it before anything runs.
    Case("nvfp4-on-h200-allow-infeasible", ["run", "--quant", "nvfp4", "--gpu", "h200-sxm", "--allow-infeasible",
                                            "--out", RUN], 2, "cannot build tp2pp2ep1: nvfp4 needs Blackwell GPUs (b200, gb200); h200-sxm is hopper", failing_dir="plan"),
    Case("tp-does-not-divide", ["run", "--tp", "3", "--out", RUN], 2, "TP 3 does not divide the 16 attention heads"),
    Case("ep-does-not-divide-tp", ["run", "--tp", "2", "--ep", "3", "--out", RUN], 2, "EP 3 must divide TP 2"),
    Case("pp-more-than-layers", ["run", "--tp", "1", "--pp", "8", "--out", RUN], 2, "PP 8 is larger than the model's 4 layers"),
    Case("tp-zero", ["run", "--tp", "0", "--out", RUN], 2, "invalid tp: Input should be greater than or equal to 1"),
    Case("yaml-malformed", ["run", "--config", "bad.yaml", "--out", RUN], 2, "config file bad.yaml is not valid YAML", bad_yaml),
    Case("yaml-unknown-key", ["run", "--config", "bad.yaml", "--out", RUN], 2, "unknown option 'tensor_parallel'", yaml_unknown_key),
    Case("env-not-an-integer", ["run", "--out", RUN], 2, "invalid tp: Input should be a valid integer", env={"DSBUILD_TP": "two"}),
    Case("model-dir-does-not-exist", ["run", "--model", "./nope", "--out", RUN], 2, "model path ./nope is not a directory"),
    Case("pull-reference-without-tag", ["pull", "oci://127.0.0.1:1/dsbuild", "dest"], 10, "reference 'oci://127.0.0.1:1/dsbuild' names no tag or digest"),
    Case("pull-not-oci", ["pull", "https://127.0.0.1:1/dsbuild:v1", "dest"], 10, "must start with oci://"),
    Case("push-missing-run-dir", ["push", "nope", "oci://127.0.0.1:1/dsbuild:v1", "--plain-http"], 2, "run directory nope does not exist"),
]


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every file (the run lock file, which holds only a pid, aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != ".dsbuild.lock":
            out[p.relative_to(root).as_posix()] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def assert_nothing_half_written(run_dir: Path, failing_dir: str | None) -> None:
    if not run_dir.exists():
        return
    assert [p.name for p in run_dir.iterdir()] not in ([], [".dsbuild.lock"]), \
        "a run that completed no stage left its directory behind"
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary directories left behind: {leftovers}"
    if failing_dir:
        assert not (run_dir / failing_dir).exists(), f"{failing_dir}/ exists after its stage failed"
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        listed = json.loads(manifest.read_text())
        for entry in listed["stages"].values():
            for f in entry["outputs"]:
                assert (run_dir / f["path"]).stat().st_size == f["size"], f


def assert_one_sentence(proc: subprocess.CompletedProcess, case_id: str) -> str:
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert ".tmp-" not in err, f"{case_id}: the error names a temporary path the user never sees: {err}"
    lines = [line for line in err.splitlines() if line.strip() and "fault-pause" not in line]
    assert lines, f"{case_id}: no error message"
    return lines[-1]


# One of each kind runs in `make test`; the whole table in `make test-full`.
FAST = {"config-missing-hidden_size", "config-contradicts-intermediate", "safetensors-truncated",
        "safetensors-overlapping-offsets", "fp8-nan-code", "index-missing-shard", "index-dotdot-path",
        "nvfp4-on-h200", "pull-reference-without-tag", "safetensors-trailing-bytes", "config-16M-layers",
        "config-5000-digit-integer", "bf16-inf", "config-file-is-dev-zero", "hardware-hbm-nan"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=() if c.id in FAST else pytest.mark.slow)
                                  for c in CASES])
def test_bad_input(case: Case, dsbuild, tmp_path, tiny_ckpt):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    if case.damage:
        case.damage(ck, tmp_path)
    before = snapshot(ck)
    proc = dsbuild(*case.args, env=case.env, timeout=300)
    message = assert_one_sentence(proc, case.id)
    assert proc.returncode == case.exit_code, (case.id, proc.returncode, proc.stderr)
    assert case.message in message, (case.id, message)
    assert snapshot(ck) == before, "the source checkpoint was changed"
    assert_nothing_half_written(tmp_path / RUN, case.failing_dir)
    if not (tmp_path / RUN).exists():  # nor the parent created for it
        assert not (tmp_path / RUN).parent.exists()
    assert not (tmp_path / "dest").exists()
    record.add("bad_inputs", case.id, exit_code=proc.returncode, message=message, item=case.item)


# --- cases that need a filesystem, a server or an in-process renderer --------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_run_directory_on_a_full_disk(dsbuild, tmp_path, tiny_ckpt):
    """A 4 MiB tmpfs holds the plan but not the ~23 MB checkpoint: fetch fails with the disk-space error."""
    with tmpfs(tmp_path / "small", "4m") as small:
        proc = dsbuild("run", "--model", str(tiny_ckpt), "--out", str(small / "r"), timeout=300)
        message = assert_one_sentence(proc, "full-disk")
        assert proc.returncode == 5, proc.stderr
        assert "stage fetch ran out of disk space writing under" in message, message
        assert_nothing_half_written(small / "r", "weights")
    record.add("bad_inputs", "run-dir-on-full-disk")


def test_run_directory_on_a_read_only_filesystem(dsbuild, tmp_path):
    """Root bypasses chmod 000, so the unwritable output is a read-only tmpfs remount (EROFS applies to root)."""
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        proc = dsbuild("run", "--out", str(ro / "r"), timeout=300)
        message = assert_one_sentence(proc, "read-only")
        assert proc.returncode == 2, proc.stderr
        assert f"cannot create the run directory {ro / 'r'}: Read-only file system" in message, message
        assert list(ro.iterdir()) == []
    record.add("bad_inputs", "run-dir-read-only")


def test_run_directory_under_a_regular_file(dsbuild, tmp_path):
    """A path whose parent is a file cannot be created, even by root."""
    (tmp_path / "afile").write_text("x")
    proc = dsbuild("run", "--out", "afile/r", timeout=300)
    message = assert_one_sentence(proc, "under-file")
    assert proc.returncode == 2, proc.stderr
    assert "cannot create the run directory afile/r: Not a directory" in message, message
    assert (tmp_path / "afile").read_text() == "x"
    record.add("bad_inputs", "run-dir-under-a-file")


@pytest.mark.slow
def test_registry_answering_500_fails_push_with_one_sentence(dsbuild, tmp_path):
    from tests.support.registry import REGISTRY_BIN, run_proxy, run_registry
    from tests.support.runs import synthetic_run

    if not Path(REGISTRY_BIN).exists():
        pytest.skip("docker-registry is not installed")
    run = tmp_path / "run"
    synthetic_run(run, write_manifest=True)
    before = snapshot(run)
    with run_registry(tmp_path / "registry") as reg, run_proxy(reg.address, fail_uploads_with=500) as proxy:
        proc = dsbuild("push", str(run), f"oci://{proxy['address']}/dsbuild:v1", "--plain-http", timeout=300)
    message = assert_one_sentence(proc, "registry-500")
    assert proc.returncode == 10, proc.stderr
    assert "500" in message, message
    assert snapshot(run) == before
    record.add("bad_inputs", "registry-500")


def test_template_with_placeholder_left_is_refused(tmp_path):
    from builder.errors import PackageError
    from triton_repo.render import render_tree

    src = tmp_path / "templates"
    (src / "m").mkdir(parents=True)
    (src / "m" / "config.pbtxt.tmpl").write_text('name: "@@{model_name}"\nmax_batch_size: @@{batch}\n')
    dst = tmp_path / "out"
    with pytest.raises(PackageError, match=r"placeholder @@\{batch\} with no value") as err:
        render_tree(src, dst, {"model_name": "tensorrt_llm"})
    assert err.value.exit_code == 8
    record.add("bad_inputs", "template-placeholder-left")
