"""Property-based tests of the parsers that face untrusted bytes: any input parses or raises dsbuild's own typed
error — never a crash, a hang or an unbounded allocation."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import CheckpointError, ModelConfigError, SpecError
from builder.model.catalog import build_catalog
from builder.model.config import PRESETS, ModelConfig
from builder.model.safetensors_io import MAX_HEADER_BYTES, parse_header_bytes, parse_index_bytes
from builder.paths import safe_relpath

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)


def header_bytes(obj, *, declared: int | None = None, pad: int = 0) -> tuple[bytes, int]:
    body = json.dumps(obj).encode()
    n = len(body) if declared is None else declared
    raw = struct.pack("<Q", n) + body
    return raw, len(raw) + pad


@FUZZ
@given(st.binary(max_size=256), st.integers(0, 1 << 40))
def test_random_bytes_never_crash_the_header_parser(raw, file_size):
    try:
        parse_header_bytes(raw, file_size=file_size)
    except CheckpointError:
        pass


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F8_E4M3", "BF16", "F32", "I8", "U8", "F64", "bogus"]) | json_scalars,
    "shape": st.lists(st.integers(-2, 2**41), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-5, 2**42), min_size=0, max_size=3) | json_values,
})


@FUZZ
@given(st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), st.integers(0, 4096))
def test_structured_headers_parse_or_raise_typed_errors(header, pad):
    raw, size = header_bytes(header, pad=pad)
    try:
        parsed = parse_header_bytes(raw, file_size=size)
    except CheckpointError:
        return
    # Whatever parsed is internally consistent: in-file, non-overlapping, sized by dtype x shape.
    data = size - len(raw)
    spans = sorted((t.begin, t.end) for t in parsed.tensors.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 <= b <= e <= data for b, e in spans)


def test_oversized_declared_header_is_refused_without_reading_it():
    raw = struct.pack("<Q", MAX_HEADER_BYTES + 1)
    try:
        parse_header_bytes(raw, file_size=1 << 40)
    except CheckpointError as exc:
        assert "over the" in str(exc)
    else:
        raise AssertionError("accepted a header larger than the limit")


@FUZZ
@given(json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=12), json_values | st.text(max_size=20), max_size=6)}))
def test_index_parser(obj):
    try:
        idx = parse_index_bytes(json.dumps(obj).encode())
    except CheckpointError:
        return
    for shard in idx.weight_map.values():
        assert not shard.startswith("/") and ".." not in shard.split("/")


@FUZZ
@given(st.text(max_size=40))
def test_safe_relpath_never_escapes(name):
    try:
        out = safe_relpath(name)
    except CheckpointError:
        return
    assert not out.startswith("/") and ".." not in out.split("/") and "\\" not in out


base_config = PRESETS["tiny"]


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(base_config)), json_values, max_size=4),
       st.lists(st.sampled_from(sorted(base_config)), max_size=3))
def test_config_json_to_catalogue(changes, removals):
    data = {**base_config, **changes}
    for k in removals:
        data.pop(k, None)
    try:
        cfg = ModelConfig.from_dict(data)
    except ModelConfigError:
        return
    # A config that parses describes a finite, consistent tensor list of bounded size.
    specs = build_catalog(cfg) if cfg.num_hidden_layers * max(cfg.n_routed_experts, 1) < 5000 else []
    assert all(all(d > 0 for d in s.shape) for s in specs)


@FUZZ
@given(st.text(max_size=200))
def test_yaml_config_files(tmp_path_factory, text):
    from builder.specs import resolve_spec

    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text)
    try:
        resolve_spec(config_file=path, environ={})
    except SpecError:
        pass


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    import pytest

    from builder.specs import resolve_spec

    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="unknown option 'a'"):
        resolve_spec(config_file=tmp_path / "bomb.yaml", environ={})
    assert time.perf_counter() - t0 < 5  # aliases are shared references, never expanded
