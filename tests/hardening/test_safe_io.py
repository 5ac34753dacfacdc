"""Issue 18 items 5, 6, 10: the one reader of untrusted files (builder/safeio.py) and the one JSON writer.

Files are read only when they are regular files and only up to their limit, whatever ``st_size`` says; JSON and
YAML parse with bounded integers and nesting and without NaN/Infinity; every JSON file dsbuild writes, and every
JSON document it prints, is strict JSON (checked by scanning a whole run)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.atomic import atomic_write_json
from builder.errors import ModelConfigError, SpecError
from builder.safeio import MAX_DEPTH, dumps_json, parse_json, parse_yaml, read_bounded
from tests.hardening import record

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _strict_loads(text: str):
    """The JSON grammar (RFC 8259) has no NaN/Infinity literals; Python's json accepts them unless told."""
    def refuse(name):
        raise ValueError(f"non-JSON literal {name}")
    return json.loads(text, parse_constant=refuse)


# --- read_bounded -------------------------------------------------------------------------------------------------

def test_read_bounded_refuses_every_kind_of_non_file_without_reading(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # no writer: a blocking open would hang here
    (tmp_path / "to-zero").symlink_to("/dev/zero")
    (tmp_path / "dir").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    cases = {tmp_path / "fifo": "a named pipe", tmp_path / "to-zero": "a character device",
             tmp_path / "dir": "a directory", tmp_path / "sock": "", "/dev/zero": "a character device",
             "/dev/urandom": "a character device", tmp_path / "missing": "does not exist"}
    try:
        for path, words in cases.items():
            done = threading.Event()
            outcome: list[BaseException] = []

            def read(path=path):
                try:
                    read_bounded(path, limit=1 << 20, what="config file", error=SpecError)
                except SpecError as exc:
                    outcome.append(exc)
                done.set()
            threading.Thread(target=read, daemon=True).start()
            assert done.wait(10), f"{path}: reading did not return"
            assert outcome and words in str(outcome[0]), (path, outcome)
    finally:
        sock.close()
    record.add("checks", "read-bounded-non-files", item=10, detail=f"{len(cases)} kinds of path refused before a byte was read")


def test_read_bounded_reads_at_most_limit_plus_one(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    assert read_bounded(big, limit=5000, what="f", error=SpecError) == b"x" * 5000
    with pytest.raises(SpecError, match="larger than 4999 bytes"):
        read_bounded(big, limit=4999, what="f", error=SpecError)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert read_bounded(empty, limit=0, what="f", error=SpecError) == b""


# --- parse_json / parse_yaml -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ('{"a": ' + "1" * 41 + "}", "an integer of 41 digits"),
    ('{"a": -' + "1" * 5000 + "}", "an integer of 5000 digits"),
    ('{"a": 1e400}', "too large to be finite"),
    ('{"a": -1E+999}', "too large to be finite"),
    ('{"a": NaN}', "NaN, which is not JSON"),
    ('[Infinity]', "Infinity, which is not JSON"),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nests deeper than {MAX_DEPTH} levels"),
    ("[" * 300_000 + "]" * 300_000, "nests too deeply"),
    ('{"a": ' * 500_000, "nests too deeply"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"a": 1,}', "not valid JSON"),
])
def test_parse_json_refuses_with_one_sentence(text, words):
    with pytest.raises(ModelConfigError, match=words):
        parse_json(text, source="config.json", error=ModelConfigError)


def test_parse_json_keeps_what_is_fine():
    value = parse_json('{"a": [1, -2, 3.5e10, "x", null, true], "b": {"c": ' + "9" * 40 + "}}", source="s",
                       error=SpecError)
    assert value == {"a": [1, -2, 3.5e10, "x", None, True], "b": {"c": int("9" * 40)}}
    deep = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(deep, source="s", error=SpecError) is not None


@pytest.mark.parametrize("text,words", [
    ("tp: " + "7" * 5000, "an integer of 5000 digits"),
    ("tp: 0x" + "f" * 100, "digits"),
    ("x: .nan", "not a finite number"),
    ("x: -.inf", "not a finite number"),
    ("x: 1.0e+999", "not a finite number"),
    ("x: " + "[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ("x: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5), "nests deeper than"),
    ("x: !!python/object/apply:os.system ['true']", "not valid YAML"),
    ("tp: [2\n", "not valid YAML"),
])
def test_parse_yaml_refuses_with_one_sentence(text, words):
    with pytest.raises(SpecError, match=words):
        parse_yaml(text, source="config file c.yaml", error=SpecError)


def test_parse_yaml_aliases_are_walked_once():
    """A billion-laughs document: nine levels of nine aliases is 9**9 leaves if expanded, 81 nodes if not."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    value = parse_yaml("\n".join(lines), source="y", error=SpecError)
    assert len(value) == 10


json_text = st.text(alphabet=st.sampled_from(list('{}[]",:0123456789.eE+-naNIfinity truefalse\\')), max_size=200)


@FUZZ
@given(st.one_of(json_text, st.binary(max_size=200)))
def test_parse_json_fuzz_returns_strict_json_or_raises_the_given_error(raw):
    try:
        value = parse_json(raw, source="fuzz", error=SpecError)
    except SpecError:
        return
    _strict_loads(dumps_json(value))  # whatever is accepted can be written back as strict JSON


@FUZZ
@given(st.one_of(json_text, st.text(max_size=200)))
def test_parse_yaml_fuzz_returns_or_raises_the_given_error(text):
    try:
        parse_yaml(text, source="fuzz", error=SpecError)
    except SpecError:
        pass


# --- strict JSON out ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,where", [
    ({"a": {"b": [1.0, math.nan]}}, "$.a.b[1]"),
    ([math.inf], "$[0]"),
    ({"report": {"min_db": -math.inf}}, "$.report.min_db"),
])
def test_the_json_writer_refuses_non_finite_numbers_naming_where(tmp_path, value, where):
    with pytest.raises(ValueError, match=r"non-finite number .* at " + re.escape(where) + " as JSON"):
        dumps_json(value)
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", value)
    assert not (tmp_path / "x.json").exists() and not list(tmp_path.iterdir())


def test_every_json_file_and_document_a_run_writes_is_strict_json(dsbuild, tmp_path):
    """A whole run (bf16: dequantized weights, the quantize report's SQNR and KL figures), plan --json, run --json
    and push's dry inputs: every *.json in the run directory parses with NaN/Infinity refused."""
    runs = [("run", "--out", "build/r", "--quant", "bf16", "--json"), ("plan", "--json", "--gpu", "h200-sxm")]
    documents = []
    for args in runs:
        proc = dsbuild(*args, timeout=600)
        assert proc.returncode == 0, proc.stderr
        documents.append(proc.stdout)
    for doc in documents:
        _strict_loads(doc)
    files = sorted((tmp_path / "build" / "r").rglob("*.json"))
    assert len(files) >= 15, files
    for f in files:
        _strict_loads(f.read_text())
    report = json.loads((tmp_path / "build" / "r" / "quantized" / "quant_report.json").read_text())
    assert report["weights"]["tensors"] > 100
    record.add("checks", "strict-json-scan", item=6, detail=f"{len(files)} JSON files of a run and {len(documents)} printed "
               "documents parse with NaN/Infinity refused")
