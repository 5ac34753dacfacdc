"""`dsbuild fetch` with the real huggingface_hub client against a local hub server on 127.0.0.1, with faults.

Every case runs the CLI in a subprocess with HF_ENDPOINT pointing at tests/support/hub_server.py and a fresh HF cache,
then checks the exact outcome: a verified checkpoint (and how it got there, from the server's request log), or a
clear one-sentence error, a non-zero exit, and nothing corrupt left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from builder.trtllm.container import CONTAINER_IMAGE
from tests.conftest import DSBUILD, isolated_env, run_dsbuild
from tests.support.hub_server import Faults, HubServer, ServedRepo, served_repo

pytestmark = pytest.mark.server

REPO_ID = "acme/tiny-v32"
TOKEN = "hf_PLANTEDtoken0123456789abcdefSECRET"
MTP_SHARD = "model-00006-of-000007.safetensors"  # the tiny model puts layer num_hidden_layers (MTP) in its own shard
BIG_SHARD = "model-00003-of-000007.safetensors"


@pytest.fixture
def serve(hub_server, tiny_ckpt):
    def _serve(repo_id: str = REPO_ID, faults: Faults | None = None) -> ServedRepo:
        return hub_server.add(served_repo(repo_id, tiny_ckpt, faults=faults))
    return _serve


@pytest.fixture
def dsb(tmp_path, hub_server):
    """Run the CLI against the local hub with a fresh HF cache (tmp_path/xdg) and no token."""
    def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full = isolated_env(**{"HF_ENDPOINT": hub_server.url, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **(env or {})})
        return subprocess.run([*DSBUILD, *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=300)
    return _run


@pytest.fixture
def fetch(dsb):
    """`dsbuild fetch --model REPO --out build/run --json ...` against the local hub."""
    def _fetch(*args: str, env: dict[str, str] | None = None, model: str = REPO_ID) -> subprocess.CompletedProcess:
        return dsb("fetch", "--model", model, "--out", "build/run", "--json", *args, env=env)
    return _fetch


def hf_cache(tmp_path: Path, repo_id: str = REPO_ID) -> Path:
    return tmp_path / "xdg" / "huggingface" / "hub" / ("models--" + repo_id.replace("/", "--"))


def fetch_info(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "build/run/manifest.json").read_text())["stages"]["fetch"]


def assert_blobs_honest(tmp_path: Path) -> None:
    """Every complete blob in the cache holds exactly the content its name (sha256 or git sha1) says."""
    blobs = hf_cache(tmp_path) / "blobs"
    for p in blobs.iterdir() if blobs.is_dir() else ():
        if p.name.endswith(".incomplete"):
            continue
        data = p.read_bytes()
        assert p.name in (hashlib.sha256(data).hexdigest(),
                          hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()), p


def assert_nothing_listed(tmp_path: Path) -> None:
    run = tmp_path / "build/run"
    assert not (run / "weights").exists()
    manifest = run / "manifest.json"
    assert not manifest.exists() or "fetch" not in json.loads(manifest.read_text())["stages"]
    assert_blobs_honest(tmp_path)


def assert_verified_weights(tmp_path: Path, repo: ServedRepo, *, skip: set[str] = frozenset()) -> None:
    weights = tmp_path / "build/run/weights"
    for path, f in repo.files.items():
        if path in skip:
            assert not (weights / path).exists(), path
            continue
        got = weights / path
        if path == "model.safetensors.index.json" and skip:
            continue  # rewritten for the kept shards
        assert hashlib.sha256(got.read_bytes()).hexdigest() == f.sha256, path
    entry = fetch_info(tmp_path)
    for o in entry["outputs"]:
        assert o["sha256"] == hashlib.sha256((tmp_path / "build/run" / o["path"]).read_bytes()).hexdigest()


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------

def test_fetch_verifies_hard_links_records_commit_and_caches(fetch, serve, hub_server, tmp_path):
    repo = serve()
    first = fetch()
    assert first.returncode == 0, first.stderr
    assert_verified_weights(tmp_path, repo)
    entry = fetch_info(tmp_path)
    assert entry["extra"] == {"source": "hub", "repo": REPO_ID, "commit": repo.commit}
    assert entry["info"]["verified_files"] == len(repo.files) and entry["info"]["commit"] == repo.commit
    assert len(hub_server.gets(f"/tree/{repo.commit}")) == 3  # 12 files, 5 per page: the Link header was followed
    shard = tmp_path / "build/run/weights" / BIG_SHARD
    blob = hf_cache(tmp_path) / "blobs" / repo.files[BIG_SHARD].sha256
    assert shard.stat().st_ino == blob.stat().st_ino  # hard link, not a copy
    # HF's own cache layout: refs and snapshot symlinks, so transformers/huggingface_hub see the files too.
    assert (hf_cache(tmp_path) / "refs/main").read_text() == repo.commit
    assert (hf_cache(tmp_path) / "snapshots" / repo.commit / BIG_SHARD).resolve() == blob.resolve()

    gets = len(hub_server.transfers(".safetensors"))
    again = fetch()
    assert json.loads(again.stdout)["stages"][1]["status"] == "cached"
    forced = fetch("--force", "fetch")
    assert forced.returncode == 0, forced.stderr
    assert len(hub_server.transfers(".safetensors")) == gets  # verified blobs are reused, not downloaded again
    assert fetch_info(tmp_path)["info"]["fetch"]["reused_files"] == len(repo.files)


def test_connection_dropped_mid_file_resumes_with_range(fetch, serve, hub_server, tmp_path):
    repo = serve(faults=Faults())
    size = repo.files[BIG_SHARD].size
    repo.faults.drop_after[BIG_SHARD] = size // 2
    repo.faults.drop_times[BIG_SHARD] = 1
    proc = fetch()
    assert proc.returncode == 0, proc.stderr
    ranges = [r.range for r in hub_server.transfers(BIG_SHARD)]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    # Resumed from the last whole chunk received before the drop, not from zero.
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2, ranges
    assert_verified_weights(tmp_path, repo)


@pytest.mark.parametrize("honest", [True, False], ids=["right-bytes", "wrong-bytes"])
def test_a_partial_file_already_at_full_size_is_verified_not_requested(fetch, serve, hub_server, tmp_path,
                                                                       tiny_ckpt, honest):
    """A kill after a file's last byte was written but before its rename leaves a full-size partial file: asking
    the hub for ``bytes=<size>-`` gets 416 Range Not Satisfiable. It is hashed instead; right bytes are kept, wrong
    ones are deleted and downloaded again from zero."""
    repo = serve()
    data = bytearray((tiny_ckpt / BIG_SHARD).read_bytes())
    if not honest:
        data[len(data) // 2] ^= 0xFF
    blobs = hf_cache(tmp_path) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / (repo.files[BIG_SHARD].etag + ".dsbuild.incomplete")).write_bytes(bytes(data))
    proc = fetch()
    assert proc.returncode == 0, proc.stderr
    info = fetch_info(tmp_path)["info"]["fetch"]
    assert info["resumed_bytes"] == len(data)
    if honest:
        assert hub_server.transfers(BIG_SHARD) == [] and info["redownloaded"] == []
    else:
        assert [r.range for r in hub_server.transfers(BIG_SHARD)] == [None] and info["redownloaded"] == [BIG_SHARD]
    assert_verified_weights(tmp_path, repo)


@pytest.mark.slow
def test_wrong_bytes_once_are_deleted_and_downloaded_again(fetch, serve, hub_server, tmp_path):
    repo = serve(faults=Faults(corrupt_times={BIG_SHARD: 1}))
    proc = fetch()
    assert proc.returncode == 0, proc.stderr
    assert fetch_info(tmp_path)["info"]["fetch"]["redownloaded"] == [BIG_SHARD]
    assert [r.range for r in hub_server.transfers(BIG_SHARD)] == [None, None]  # the second download starts from zero
    assert_verified_weights(tmp_path, repo)


def test_wrong_bytes_twice_fail_naming_the_file_and_leave_nothing(fetch, serve, tmp_path):
    repo = serve(faults=Faults(corrupt_times={BIG_SHARD: 2}))
    proc = fetch()
    assert proc.returncode == 3
    msg = error_line(proc)
    assert BIG_SHARD in msg and "failed verification twice" in msg and repo.files[BIG_SHARD].sha256 in msg
    assert_nothing_listed(tmp_path)
    blobs = hf_cache(tmp_path) / "blobs"
    assert not (blobs / repo.files[BIG_SHARD].sha256).exists()
    assert not list(blobs.glob(f"{repo.files[BIG_SHARD].sha256}*"))


def test_http_500_then_success(fetch, serve, hub_server, tmp_path):
    repo = serve(faults=Faults(error500_times={BIG_SHARD: 2, "config.json": 1, "api/revision": 1, "api/tree": 1}))
    proc = fetch()
    assert proc.returncode == 0, proc.stderr
    assert [r.status for r in hub_server.transfers(BIG_SHARD)] == [500, 500, 200]
    assert [r.status for r in hub_server.gets(f"/tree/{repo.commit}")] == [500, 200, 200, 200]  # 500, then 3 pages
    assert fetch_info(tmp_path)["info"]["fetch"]["retries"] >= 2
    assert_verified_weights(tmp_path, repo)


def test_gated_repo_401_without_token_and_ok_with_it_token_never_leaks(fetch, serve, hub_server, tmp_path):
    repo = serve(faults=Faults(gated_token=TOKEN))
    denied = fetch()
    assert denied.returncode == 4
    assert "is gated" in error_line(denied) and "HF_TOKEN" in error_line(denied)
    assert_nothing_listed(tmp_path)

    wrong = fetch(env={"HF_TOKEN": TOKEN[:-6] + "WRONG!"})
    assert wrong.returncode == 4 and TOKEN[:-6] not in wrong.stderr + wrong.stdout

    ok = fetch(env={"HF_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert_verified_weights(tmp_path, repo)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub_server.gets(".safetensors"))
    dry = fetch("--dry-run", env={"HF_TOKEN": TOKEN})
    assert dry.returncode == 0
    # The planted token appears in no output and no file dsbuild or the cache wrote.
    for proc in (denied, wrong, ok, dry):
        assert TOKEN not in proc.stdout + proc.stderr
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []


@pytest.mark.slow
def test_stored_login_token_is_used(fetch, serve, hub_server, tmp_path):
    serve(faults=Faults(gated_token=TOKEN))
    token_file = tmp_path / "xdg" / "huggingface" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    proc = fetch()
    assert proc.returncode == 0, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert [p for p in (tmp_path / "build").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()] == []


@pytest.mark.slow
def test_unknown_revision(fetch, serve, tmp_path):
    serve()
    proc = fetch("--revision", "v9.9")
    assert proc.returncode == 4
    assert "revision not found" in error_line(proc) and "'v9.9'" in error_line(proc)
    assert_nothing_listed(tmp_path)


def test_unknown_repo(fetch, serve, tmp_path):
    serve()
    proc = fetch(model="acme/no-such-model")
    assert proc.returncode == 4
    assert "acme/no-such-model" in error_line(proc) and "does not exist" in error_line(proc)
    assert not (tmp_path / "build/run/weights").exists()


def test_tree_listing_with_dotdot_path_is_refused(fetch, serve, tmp_path):
    serve(faults=Faults(extra_tree_entries=[{"type": "file", "path": "../../evil.safetensors", "size": 4,
                                             "oid": "0" * 40}]))
    proc = fetch()
    assert proc.returncode == 3
    assert "'../../evil.safetensors'" in error_line(proc) and "escape" in error_line(proc)
    assert_nothing_listed(tmp_path)
    assert not list(tmp_path.rglob("evil*"))


def _start_throttled_fetch(tmp_path: Path, hub_server: HubServer) -> tuple[subprocess.Popen, list[str], dict]:
    env = isolated_env(HF_ENDPOINT=hub_server.url, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [*DSBUILD, "fetch", "--model", REPO_ID, "--out", "build/run", "--fetch-workers", "2", "--json"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    blobs = hf_cache(tmp_path) / "blobs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        parts = list(blobs.glob("*.dsbuild.incomplete")) if blobs.is_dir() else []
        if any(p.stat().st_size > 1_000_000 for p in parts):
            return proc, cmd, env
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the download never started")


def _rerun_resumes(tmp_path: Path, hub_server: HubServer, repo: ServedRepo, cmd: list[str], env: dict) -> None:
    blobs = hf_cache(tmp_path) / "blobs"
    had = {p.name: p.stat().st_size for p in blobs.glob("*.dsbuild.incomplete")}
    assert had
    repo.faults.bytes_per_s = None
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert_verified_weights(tmp_path, repo)
    assert fetch_info(tmp_path)["info"]["fetch"]["resumed_bytes"] >= sum(had.values())
    resumed = [r.range for r in hub_server.transfers(".safetensors") if r.range]
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in resumed), resumed
    assert not list(blobs.glob("*.incomplete"))


def test_kill_9_mid_download_then_rerun_resumes_and_verifies(tmp_path, serve, hub_server):
    repo = serve(faults=Faults(bytes_per_s=2_000_000))
    proc, cmd, env = _start_throttled_fetch(tmp_path, hub_server)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert_nothing_listed(tmp_path)
    _rerun_resumes(tmp_path, hub_server, repo, cmd, env)


@pytest.mark.slow
def test_ctrl_c_stops_all_transfers_promptly_and_the_rerun_resumes(tmp_path, serve, hub_server):
    repo = serve(faults=Faults(bytes_per_s=1_000_000))
    proc, cmd, env = _start_throttled_fetch(tmp_path, hub_server)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert time.monotonic() - t0 < 10  # not waiting for the throttled files to finish
    assert_nothing_listed(tmp_path)
    _rerun_resumes(tmp_path, hub_server, repo, cmd, env)


def test_skip_mtp_fetches_only_needed_shards_and_writes_a_consistent_index(fetch, serve, hub_server, tmp_path):
    repo = serve()
    proc = fetch("--skip-mtp")
    assert proc.returncode == 0, proc.stderr
    assert hub_server.transfers(MTP_SHARD) == []  # only its header was read
    assert_verified_weights(tmp_path, repo, skip={MTP_SHARD})
    index = json.loads((tmp_path / "build/run/weights/model.safetensors.index.json").read_text())
    assert MTP_SHARD not in index["weight_map"].values()
    assert index["metadata"]["dsbuild"]["dropped_shards"] == [MTP_SHARD]
    info = fetch_info(tmp_path)["info"]
    assert info["dropped_shards"] == 1 and info["kept_mtp_tensors"] == 0


@pytest.mark.slow
def test_offline_reuses_the_cache_and_names_what_is_missing(fetch, serve, hub_server, tmp_path):
    repo = serve()
    assert fetch().returncode == 0
    n = len(hub_server.requests)
    offline = fetch("--force", "fetch", env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert len(hub_server.requests) == n  # no traffic at all
    assert_verified_weights(tmp_path, repo)

    (hf_cache(tmp_path) / "blobs" / repo.files[BIG_SHARD].sha256).unlink()
    missing = fetch("--force", "fetch", env={"HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 4
    assert "HF_HUB_OFFLINE" in error_line(missing) and BIG_SHARD in error_line(missing)


@pytest.mark.slow
def test_offline_with_empty_cache(fetch, serve, tmp_path):
    serve()
    proc = fetch(env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 4 and "HF_HUB_OFFLINE" in error_line(proc)


def test_disk_space_checked_before_any_download(fetch, serve, hub_server, tmp_path):
    serve()
    proc = fetch(env={"DSBUILD_FREE_SPACE_BYTES": "1000000"})
    assert proc.returncode == 5
    msg = error_line(proc)
    assert "not enough disk space" in msg and "1000000 bytes) is free" in msg and "still needed" in msg
    assert [r for r in hub_server.requests if "/resolve/" in r.path and r.method == "GET"
            and not r.path.endswith("config.json")] == []
    assert_nothing_listed(tmp_path)


@pytest.mark.slow
def test_disk_space_on_a_real_small_filesystem(fetch, serve, hub_server, tmp_path):
    """A 4 MB tmpfs as the HF cache (root only; elsewhere the env probe above covers the check)."""
    serve()
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = fetch(env={"HF_HUB_CACHE": str(mount)})
        assert proc.returncode == 5
        assert "not enough disk space" in error_line(proc) and str(mount) in error_line(proc)
        assert not any(p.suffix == ".safetensors" or len(p.name) == 64 for p in mount.rglob("*"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_include_exclude(fetch, serve, hub_server, tmp_path):
    serve()
    proc = fetch("--exclude", "tokenizer*")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "build/run/weights/tokenizer.json").exists()
    assert hub_server.gets("tokenizer.json") == []
    bad = fetch("--exclude", "model-00003-*", "--force", "fetch")
    assert bad.returncode == 3 and "model-00003-of-000007.safetensors" in error_line(bad)
    assert "--include/--exclude" in error_line(bad)


@pytest.mark.slow
def test_dry_run_reports_bytes_present_and_to_download(fetch, serve, hub_server, tmp_path):
    repo = serve()
    total = sum(f.size for f in repo.files.values())
    before = json.loads(fetch("--dry-run").stdout)["stages"][1]
    plan = before["info"]["plan"]
    assert before["status"] == "would build"
    assert plan["commit"] == repo.commit and plan["total_bytes"] == total and plan["files"] == len(repo.files)
    assert plan["download_bytes"] == total - plan["present_bytes"]
    assert not (tmp_path / "build/run/weights").exists()
    # Only the shards' headers were read (range requests of the pre-download check), no weights downloaded.
    shard_reqs = [r for r in hub_server.requests if "/resolve/" in r.path and r.path.endswith(".safetensors")]
    assert all(r.method == "HEAD" or r.range in ("bytes=0-100000",) or (r.range or "").startswith("bytes=8-")
               for r in shard_reqs), shard_reqs
    assert plan["header_check"]["ok"]

    assert fetch().returncode == 0
    after = json.loads(fetch("--dry-run", "--force", "fetch").stdout)["stages"][1]["info"]["plan"]
    assert after["download_bytes"] == 0 and after["present_bytes"] == total and after["to_download"] == []


@pytest.mark.slow
def test_local_directory_is_linked_and_validated(tiny_ckpt, tmp_path):
    ok = run_dsbuild("fetch", "--model", str(tiny_ckpt), "--out", "build/run", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "build/run/weights" / BIG_SHARD).stat().st_ino == (tiny_ckpt / BIG_SHARD).stat().st_ino

    broken = tmp_path / "broken"
    broken.mkdir()
    for p in tiny_ckpt.iterdir():
        os.link(p, broken / p.name) if p.name != BIG_SHARD else (broken / p.name).write_bytes(p.read_bytes()[:1000])
    bad = run_dsbuild("fetch", "--model", str(broken), "--out", "build/bad", cwd=tmp_path)
    assert bad.returncode == 3 and BIG_SHARD in error_line(bad) and "truncated" in error_line(bad)
    assert not (tmp_path / "build/bad/weights").exists()


# ---------------------------------------------------------------------------------------------------------------
# The `make engine MODEL=deepseek-ai/DeepSeek-V3.2 ...` flow on a CPU host

@pytest.mark.slow
def test_real_model_run_plans_then_fails_the_disk_check_before_downloading(dsb, serve, hub_server, tmp_path):
    serve("deepseek-ai/DeepSeek-V3.2")  # the route a real run takes; the disk probe says there is no room
    proc = dsb("run", "--model", "deepseek-ai/DeepSeek-V3.2", "--tp", "8", "--pp", "2", "--gpu", "h200-sxm",
               "--nodes", "2", "--out", "build/run", env={"DSBUILD_FREE_SPACE_BYTES": "50000000"})
    assert proc.returncode == 5, proc.stderr
    assert "quantize, build, package are left for the GPU host" in proc.stderr and "689.5 GB" in proc.stderr
    assert "not enough disk space" in error_line(proc)
    stages = json.loads((tmp_path / "build/run/manifest.json").read_text())["stages"]
    assert set(stages) == {"plan"}  # planned first, then stopped before any weights came
    assert [r for r in hub_server.requests if r.method == "GET" and r.path.endswith(".safetensors")] == []


@pytest.mark.slow
def test_run_leaves_big_stages_for_the_gpu_host_with_a_command_that_finishes_the_job(dsb, serve, tmp_path):
    repo = serve()
    small_host = {"DSBUILD_CPU_MAX_CHECKPOINT_BYTES": "1000"}
    proc = dsb("run", "--model", REPO_ID, "--tp", "2", "--pp", "2", "--out", "build/run", "--json", env=small_host)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [(s["stage"], s["status"]) for s in out["stages"]] == [
        ("plan", "built"), ("fetch", "built"), ("quantize", "left for GPU host"), ("build", "left for GPU host"),
        ("package", "left for GPU host")]
    left = out["left_for_gpu_host"]
    assert left["stages"] == ["quantize", "build", "package"] and CONTAINER_IMAGE in left["where"]
    assert f"--revision {repo.commit}" in left["command"] and "--out build/run" in left["command"]
    assert not (tmp_path / "build/latest").exists()  # the run is not complete

    # The printed command, run where the host can take the rest, reuses plan and fetch and finishes.
    args = left["command"].split()[2:]
    done = dsb("run", *args, "--json")
    assert done.returncode == 0, done.stderr
    status = {s["stage"]: s["status"] for s in json.loads(done.stdout)["stages"]}
    assert status == {"plan": "cached", "fetch": "cached", "quantize": "built", "build": "built", "package": "built"}


@pytest.mark.slow
def test_two_processes_sharing_a_cache_download_each_file_once(tmp_path, serve, hub_server):
    """Several nodes fetching onto shared storage at once: the per-blob lock (the one huggingface_hub also takes)
    makes each file travel once, and both runs end verified."""
    repo = serve(faults=Faults(bytes_per_s=20_000_000))
    env = isolated_env(HF_ENDPOINT=hub_server.url, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    procs = [subprocess.Popen([*DSBUILD, "fetch", "--model", REPO_ID, "--out", f"build/node{i}", "--json"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for path in repo.files:
        if path.endswith(".safetensors"):
            assert len(hub_server.transfers(path)) == 1, path
    blob = hf_cache(tmp_path) / "blobs" / repo.files[BIG_SHARD].sha256
    for i in range(2):
        assert (tmp_path / f"build/node{i}/weights" / BIG_SHARD).stat().st_ino == blob.stat().st_ino
    assert_blobs_honest(tmp_path)


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed): connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _retry_lines(stderr: str) -> tuple[list[str], float]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    retries = [line for line in lines if line.startswith("hub: ")]
    waits = sum(float(line.rsplit(" in ", 1)[1].removesuffix(" s")) for line in retries)
    return retries, waits


def test_unreachable_hub_is_one_line_per_retry_and_one_sentence(dsb, tmp_path):
    """huggingface_hub's hf_hub_download alone would print ten lines and sleep 23 s (1+2+4+8+8) before failing."""
    port = _closed_port()
    for args in (["plan", "--model", REPO_ID],
                 ["fetch", "--model", "deepseek-ai/DeepSeek-V3.2", "--gpu", "h200-sxm", "--nodes", "2", "--tp", "8",
                  "--pp", "2", "--out", "build/r"]):
        res = dsb(*args, env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
        assert res.returncode == 4, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        retries, waits = _retry_lines(res.stderr)
        assert lines[:-1] == retries, lines  # nothing but the retry lines and the final sentence
        assert len(retries) == 3 and waits <= 4, retries
        assert all(f"ConnectError from http://127.0.0.1:{port}; retry" in line for line in retries), retries
        assert lines[-1].startswith(f"error: cannot reach the hub at http://127.0.0.1:{port} (ConnectError)"), lines


def test_plan_reads_config_json_from_the_hub_then_from_the_cache_when_the_hub_is_gone(dsb, serve, hub_server,
                                                                                       tmp_path):
    serve()
    first = dsb("plan", "--model", REPO_ID, "--json")
    assert first.returncode == 0, first.stderr
    assert len(hub_server.gets("/config.json")) == 1  # that one file, through dsbuild's own client
    again = dsb("plan", "--model", REPO_ID, "--json", env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["layouts"] == json.loads(first.stdout)["layouts"]
    assert len(_retry_lines(again.stderr)[0]) == 3  # it said it was retrying, then used the cached copy
