"""--skip-mtp shard selection, include/exclude globs, git/LFS digests, disk-space arithmetic, spec -> flags."""

from __future__ import annotations

import pytest

from builder import hub
from builder.errors import DiskSpaceError, UnsafePathError
from builder.hostfit import spec_flags
from builder.model.config import tiny_config
from builder.model.safetensors_io import CheckpointIndex
from builder.model.selection import path_selected, select_shards
from builder.specs import RunSpec


def test_skip_mtp_keeps_shards_with_needed_tensors_whole_and_says_which_mtp_tensors_stay():
    cfg = tiny_config()
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    index = CheckpointIndex({
        "model.embed_tokens.weight": "a.safetensors",
        mtp + "enorm.weight": "b.safetensors", mtp + "hnorm.weight": "b.safetensors",  # MTP only: dropped
        mtp + "eh_proj.weight": "c.safetensors", "lm_head.weight": "c.safetensors",   # shared: kept whole
    }, {})
    sel = select_shards(index, cfg, skip_mtp=True)
    assert sel.shards == ["a.safetensors", "c.safetensors"] and sel.dropped_shards == ["b.safetensors"]
    assert sel.weight_map == {"model.embed_tokens.weight": "a.safetensors", mtp + "eh_proj.weight": "c.safetensors",
                              "lm_head.weight": "c.safetensors"}
    assert sel.kept_mtp_tensors == [mtp + "eh_proj.weight"] and sel.dropped_tensors == 2
    full = select_shards(index, cfg, skip_mtp=False)
    assert full.complete and full.weight_map == index.weight_map


@pytest.mark.parametrize("path,include,exclude,selected", [
    ("model-00001-of-000163.safetensors", [], [], True),
    ("inference/model.py", [], ["inference/"], False),
    ("figures/a.png", ["*.safetensors", "*.json"], [], False),
    ("config.json", ["*.safetensors", "*.json"], ["tokenizer*"], True),
    ("tokenizer.json", [], ["tokenizer*"], False),
])
def test_path_selected(path, include, exclude, selected):
    assert path_selected(path, include=include, exclude=exclude) is selected


def test_git_blob_digest_matches_git_and_lfs_uses_sha256(tmp_path):
    data = b"hello\n"
    p = tmp_path / "f"
    p.write_bytes(data)
    small = hub.RepoFile("f", len(data), "ce013625030ba8dba906f756967f9e9ca394464a", None)  # `git hash-object`
    d = hub._digest_prefix(p, small).hexdigests()
    assert d["sha1"] == small.blob_id and hub._digest_ok(small, d)
    big = hub.RepoFile("f", len(data), "0" * 40, "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
    assert hub._digest_ok(big, hub._digest_prefix(p, big).hexdigests())
    assert not hub._digest_ok(hub.RepoFile("f", len(data), "1" * 40, None), d)


def test_tree_entries_that_escape_or_carry_bad_oids_are_refused(tmp_path):
    repo = hub.HubRepo("a/b", tmp_path, "http://127.0.0.1:1", offline=False)
    for bad in ("../x", "/etc/passwd", "a/../../x", "a\\\\b"):
        with pytest.raises(UnsafePathError):
            hub._parse_file(bad, 1, "0" * 40, None, repo=repo)
    with pytest.raises(Exception, match="invalid LFS sha256"):
        hub._parse_file("x.safetensors", 1, "0" * 40, "../../etc", repo=repo)


def test_disk_check_sums_needs_on_one_volume_and_names_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.FREE_SPACE_ENV, str(hub.DISK_RESERVE_BYTES + 1000))
    hub.check_disk_space([("the hub cache", tmp_path, 600), ("the run directory", tmp_path, 400)])
    with pytest.raises(DiskSpaceError, match=r"the hub cache at .* 600 B \+ the run directory at .* 401 B = 1.0 KB \(1001 bytes\) still needed, "
                       r"but only .* \(268436456 bytes\) is free .*; free 1 B"):
        hub.check_disk_space([("the hub cache", tmp_path, 600), ("the run directory", tmp_path, 401)])


def test_endpoint_credentials_are_not_shown():
    assert hub.shown_endpoint("https://user:secret@hub.example/x") == "https://hub.example/x"


def test_spec_flags_reproduce_the_spec():
    from builder.cli import main, spec_from

    spec = RunSpec(model="deepseek-ai/DeepSeek-V3.2", tp=8, pp=2, gpu="h200-sxm", nodes=2, skip_mtp=True,
                   exclude=["inference/*", "figures/*"])
    flags = spec_flags(spec, overrides={"revision": "f" * 40})
    ctx = main.commands["run"].make_context("run", list(flags))
    params = {k: v for k, v in ctx.params.items() if k not in ("config_file", "verbose", "force", "dry_run", "as_json",
                                                                "wait")}
    # Values compared (the resolved spec also records where each value came from, a private attribute).
    assert spec_from(params, None).model_dump() == spec.model_copy(update={"revision": "f" * 40}).model_dump()
