"""Issue 18 item 9: no value reaches a generated script, manifest or directive except validated or quoted for the
context it lands in.

Contexts and their rule (one validation point, ``builder.specs.check_value``; one renderer, ``builder.render``):
- ``#SBATCH`` directives (Slurm parses them before the shell: no quoting exists) -> --slurm-time, --slurm-partition,
  --slurm-account and the run directory's name are validated; a newline, space, quote or ``;`` is refused.
- YAML (lws.yaml, model.yaml) -> built as data and dumped by PyYAML, never spliced as text; Kubernetes names
  (--k8s-namespace, --k8s-pvc) and images are validated against Kubernetes' own syntax as well.
- shell (serve.sh, slurm.sbatch, kubexec.sh) -> every value either validated (images, counts) or a quoted word, and
  the deploy directory chosen at launch is only ever used as a quoted variable.
- protobuf text format (config.pbtxt) -> string values escaped by the ``pbtxt`` filter.

Each hostile value is tried at every way in (CLI, config file, environment, the Python API), hostile values that are
legal (paths with quotes, ``;``, ``$()``, spaces) are executed with stand-in binaries and must arrive as one literal
argument, and a property test renders arbitrary accepted values and parses every file back.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import SpecError
from builder.layout import Layout
from builder.render import render_text
from builder.specs import RULES, check_value, resolve_spec
from tests.hardening import record
from tests.support.triton import fixed_inputs, parse_config_pbtxt
from triton_repo.launch import lws_manifests, topology
from triton_repo.package import render_launch, write_package

HOSTILE = {
    "slurm_time": ["04:00:00\n#SBATCH --uid=0", "04:00:00\nrm -rf /", "1:00:00; touch PWNED", "04:00:00 #",
                   "$(touch PWNED)", "1-00:00:00\r#SBATCH --x", "", "04:00:00\x00"],
    "slurm_partition": ["gpu\n#SBATCH --exclusive", "gpu --uid=0", 'gpu"', "gpu;id", "$(id)", "-", ""],
    "slurm_account": ["infra\ntouch PWNED", "a b", "a'b", "`id`", "a\tb"],
    "k8s_namespace": ["llm\n  hostNetwork: true", "llm: x", "{a: b}", "LLM", "-llm", "a" * 64, "llm#x", "'llm'"],
    "k8s_pvc": ["run\n- x", "run: {x: 1}", "Run Dir", "run/../x", "*run", "&a", "run\x85"],
    "image": ['nvcr.io/x:1"; touch PWNED; "', "$(touch PWNED)", "img\n  privileged: true", "img name", "img}",
              "img'x", "-img"],
    "k8s_kubectl_image": ["k\nubectl", "kubectl;id", 'kubectl"', "kubectl `id`"],
    "model_path": ["/data/ckpt\nrm -rf /", "/data/\rckpt", "/data/\x00", "", "/data/\x1b[31m"],
}
LEGAL_PATHS = ['/data/a b', "/data/it's", '/data/x"; touch PWNED; echo "', "/data/$(touch PWNED)",
               "/data/`touch PWNED`", "/data/a;touch PWNED", "/data/${IFS}PWNED", "/data/a'b\"c", "/data/ünï",
               "/data/a\\b", "/data/*", "/data/-n", "/data/&&touch PWNED", "/data/|touch PWNED", "/data/>PWNED"]
HOSTILE_DIR_NAMES = ['d x"; touch PWNED; echo "', "d$(touch PWNED)", "d`touch PWNED`", "d;touch PWNED", "d 'q'",
                     "-n", "d*", "d${IFS}x", "d&&touch PWNED", "d|touch PWNED", "d>PWNED", "d\\x"]


def slug(value: str) -> str:
    """A table-safe name for docs/hardening.md."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value)[:24] or "empty"


def inputs(**over):
    return fixed_inputs("gpu", "1.2.1", **{"nodes": 2, "layout": Layout(tp=8, pp=2), **over})


def _fake_bin(root: Path, name: str, body: str) -> None:
    root.mkdir(exist_ok=True)
    path = root / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _no_pwned(*roots: Path) -> None:
    for root in roots:
        assert not list(root.rglob("PWNED")), f"a hostile value ran as a command under {root}"


@pytest.mark.parametrize("field,value", [(f, v) for f, values in HOSTILE.items() for v in values],
                         ids=lambda x: repr(x)[:40])
def test_hostile_value_is_refused_at_every_way_in(field, value, tmp_path):
    """The CLI/config/environment (one spec validator) and the Python API (the renderer's own check) both refuse."""
    cli_field = field.replace("_", "-")
    with pytest.raises(SpecError, match=f"invalid {cli_field}"):
        resolve_spec(cli={field: value})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({field: value}))
    with pytest.raises(SpecError, match=f"invalid {cli_field}"):
        resolve_spec(config_file=tmp_path / "c.yaml")
    if value and "\x00" not in value:  # an environment cannot carry NUL; an empty variable counts as unset
        with pytest.raises(SpecError, match=f"invalid {cli_field}"):
            resolve_spec(environ={f"DSBUILD_{field.upper()}": value})
    with pytest.raises(SpecError, match=f"invalid {cli_field}"):
        render_launch(inputs(**{field: value}), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # refused before any file
    record.add("bad_inputs", f"launch-value-{field}-{slug(value)}", exit_code=2, message=f"invalid {cli_field}", item=9)


@pytest.mark.parametrize("name", ['r"; touch PWNED; echo "', "r\n#SBATCH --uid=0", "r;id", "r $(id)", "-r", ".r"])
def test_a_hostile_run_directory_name_is_refused_before_any_stage(name, dsbuild, tmp_path):
    proc = dsbuild("run", "--gpu", "h200-sxm", "--out", f"build/{name}", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "invalid run-name" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "build" / name / "plan").exists()  # refused before the plan stage ran
    _no_pwned(tmp_path)
    record.add("bad_inputs", f"run-name-{slug(name)}", exit_code=2, message="invalid run-name", item=9)


def test_the_build_time_deploy_dir_option_is_gone(dsbuild, tmp_path):
    """The issue's example: --deploy-dir used to land verbatim in three files; the deploy directory is now chosen at
    launch and never written into a generated file."""
    proc = dsbuild("run", "--gpu", "h200-sxm", "--deploy-dir", '/shared/run"; touch /tmp/x; echo "', "--out", "r",
                   timeout=300)
    assert proc.returncode == 2 and "No such option '--deploy-dir'" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("model", LEGAL_PATHS, ids=lambda x: repr(x)[:30])
def test_a_legal_but_hostile_checkpoint_path_stays_one_literal_word(model, tmp_path):
    deploy = tmp_path / "deploy"
    write_package(inputs(model_path=model), deploy / "package")
    bin_dir = tmp_path / "bin"
    _fake_bin(bin_dir, "srun", 'for a in "$@"; do printf "%s\\n" "$a"; done >> "$LOG"\n')
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(deploy)], cwd=tmp_path,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "log").read_text().splitlines()
    assert f"--container-mounts={deploy}:{deploy},{model}:{model}" in args
    model_yaml = yaml.safe_load((deploy / "package/triton_repo/tensorrt_llm/1/model.yaml").read_text())
    assert model_yaml["model"] == model  # YAML built as data: the path comes back unchanged
    lws = list(yaml.safe_load_all((deploy / "package/launch/lws.yaml").read_text()))
    assert [d["kind"] for d in lws] == ["LeaderWorkerSet", "Service", "ServiceAccount", "Role", "RoleBinding"]
    _no_pwned(tmp_path)
    record.add("bad_inputs", f"legal-hostile-model-path-{slug(model[6:])}", exit_code=0,
               message="accepted: one literal --container-mounts word, model.yaml round-trips, nothing else ran",
               item=9)


@pytest.mark.parametrize("name", HOSTILE_DIR_NAMES, ids=lambda x: repr(x)[:30])
def test_a_hostile_deploy_directory_chosen_at_launch_is_only_ever_a_quoted_word(name, tmp_path):
    """serve.sh (default, --deploy-dir, DSBUILD_DEPLOY_DIR) and slurm.sbatch (argument) started from a directory
    whose name is shell syntax: tritonserver/srun receive it as one literal path and nothing else runs."""
    built = tmp_path / "built"
    write_package(fixed_inputs("gpu", "1.2.1"), built / "package")
    parent = tmp_path / "srv"
    parent.mkdir()
    deploy = parent / name
    shutil.copytree(built, deploy)
    bin_dir = tmp_path / "bin"
    _fake_bin(bin_dir, "tritonserver", 'printf "%s\\n" "$DSBUILD_DEPLOY_DIR" "$@" > "$LOG"\n')
    _fake_bin(bin_dir, "srun", 'for a in "$@"; do printf "%s\\n" "$a"; done > "$LOG"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LOG": str(tmp_path / "log")}
    serve = str(deploy / "package/launch/serve.sh")
    for argv, extra in (([serve], {}), ([serve, "--deploy-dir", str(deploy)], {}),
                        ([serve], {"DSBUILD_DEPLOY_DIR": str(deploy)})):
        proc = subprocess.run(["bash", *argv], cwd=parent, env={**env, **extra}, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        got = (tmp_path / "log").read_text().splitlines()
        assert got[0] == str(deploy) and got[1] == f"--model-repository={deploy}/package/triton_repo", got
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(deploy)], cwd=parent, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "log").read_text().splitlines()
    assert f"--container-mounts={deploy}:{deploy}" in args and f"--model-repository={deploy}/package/triton_repo" in args
    _no_pwned(tmp_path)
    record.add("bad_inputs", f"hostile-deploy-dir-{slug(name)}", exit_code=0,
               message="serve.sh/slurm.sbatch pass it as one literal path, nothing else ran", item=9)


def test_a_deploy_directory_pyxis_cannot_mount_is_refused_at_launch(tmp_path):
    deploy = tmp_path / "a,b:c"
    write_package(fixed_inputs("gpu", "1.2.1"), deploy / "package")
    proc = subprocess.run(["bash", str(deploy / "package/launch/slurm.sbatch"), str(deploy)], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2 and "may not contain ',' or ':'" in proc.stderr


def test_pbtxt_strings_are_escaped_for_tritons_parser(tmp_path):
    """The CPU flavour's config.pbtxt carries the dsbuild source path: quotes, backslashes and control characters in
    it come back unchanged through Triton's own protobuf."""
    src = '/opt/my "dsbuild"\\src\tx'
    p = fixed_inputs("cpu", "1.2.1", layout=Layout(tp=2, pp=1), run_name="tiny-fp8-tp2pp1ep1", dsbuild_src=src,
                     max_seq_len=512)
    write_package(p, tmp_path / "package")
    cfg = parse_config_pbtxt(tmp_path / "package/triton_repo/tensorrt_llm/config.pbtxt")
    assert cfg.parameters["dsbuild_src"].string_value == src


def test_the_sh_filter_makes_one_word(tmp_path):
    for value in LEGAL_PATHS + HOSTILE_DIR_NAMES + ["", "a\nb"]:
        script = render_text("printf '%s\\n' @@{v|sh}\n", {"v": value}, name="t")
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert out.stdout == value + "\n", (value, out.stdout)
    _no_pwned(tmp_path)


# --- property: whatever the validators accept renders into files that parse back to exactly that value -----------

def _accepted(field: str):
    return st.from_regex(RULES[field][0], fullmatch=True).filter(lambda v: len(v) <= 60)


def _sbatch_directives(text: str) -> dict[str, str]:
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH --")
                and "=" in line)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(time=st.sampled_from(["04:00:00", "1-00:00:00", "30", "UNLIMITED", "2-3", "10:00"]),
       partition=_accepted("slurm_partition"), account=_accepted("slurm_account"),
       namespace=st.from_regex(RULES["k8s_namespace"][0], fullmatch=True).filter(lambda v: len(v) <= 63),
       pvc=st.from_regex(RULES["k8s_pvc"][0], fullmatch=True).filter(lambda v: len(v) <= 253),
       image=_accepted("image"))
def test_accepted_values_round_trip_through_every_file(time, partition, account, namespace, pvc, image):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "launch"
        render_launch(inputs(slurm_time=time, slurm_partition=partition, slurm_account=account, k8s_namespace=namespace,
                             k8s_pvc=pvc, image=image), out)
        sbatch = (out / "slurm.sbatch").read_text()
        directives = _sbatch_directives(sbatch)
        assert set(directives) == {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "time", "output",
                                   "partition", "account"}, directives
        assert (directives["time"], directives["partition"], directives["account"]) == (time, partition, account)
        assert subprocess.run(["bash", "-n", str(out / "slurm.sbatch")], capture_output=True).returncode == 0
        docs = list(yaml.safe_load_all((out / "lws.yaml").read_text()))
        lws = docs[0]
        assert all(d["metadata"]["namespace"] == namespace for d in docs)
        pod = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
        assert pod["containers"][0]["image"] == image
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc


def test_the_validators_refuse_every_control_character():
    for field in RULES:
        for c in map(chr, list(range(0x20)) + [0x7F]):
            value = {"slurm_time": "04:00:00", "k8s_namespace": "llm", "k8s_pvc": "run",
                     "model_path": "/data/x"}.get(field, "name") + c
            with pytest.raises(SpecError):
                check_value(field, value)


def test_a_direct_call_cannot_skip_validation():
    """lws_manifests validates on its own (callers other than the CLI cannot pass an unchecked namespace)."""
    topo = topology(Layout(tp=8, pp=2), nodes=2, node_gpus=8)
    with pytest.raises(SpecError, match="invalid k8s-namespace"):
        lws_manifests(run_name="r", topo=topo, image="img", pvc="run", namespace="llm\n  x: y", kubectl_image="k")
