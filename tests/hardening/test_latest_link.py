"""Issue 18 item 8: ``<parent>/latest`` is replaced only when it is a link dsbuild made; anything else is refused
with one sentence before a stage runs, untouched, and no ``.latest.tmp-*`` is left behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from tests.hardening import record
from tests.hardening.test_bad_inputs import assert_one_sentence, snapshot


def regular_file(build: Path) -> None:
    (build / "latest").write_text("my notes\n")


def directory(build: Path) -> None:
    (build / "latest").mkdir()
    (build / "latest" / "keep.txt").write_text("mine\n")


def absolute_link(build: Path) -> None:
    (build / "latest").symlink_to("/etc")


def link_to_a_users_directory(build: Path) -> None:
    (build / "mydata").mkdir()
    (build / "mydata" / "x").write_text("x")
    (build / "latest").symlink_to("mydata")


def link_into_a_subdirectory(build: Path) -> None:
    (build / "runs" / "r0").mkdir(parents=True)
    (build / "runs" / "r0" / "manifest.json").write_text('{"stages": {}}')
    (build / "latest").symlink_to("runs/r0")


def link_to_a_file(build: Path) -> None:
    (build / "notes").write_text("n")
    (build / "latest").symlink_to("notes")


def fifo(build: Path) -> None:
    os.mkfifo(build / "latest")


REFUSED: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    ("latest-is-a-regular-file", regular_file, [], "build/latest is a file; dsbuild keeps 'latest' pointing at the newest run"),
    ("latest-is-a-directory", directory, [], "build/latest is a directory; dsbuild keeps 'latest'"),
    ("latest-is-a-fifo", fifo, [], "build/latest is a file"),
    ("latest-links-to-an-absolute-path", absolute_link, [], "is a symbolic link to '/etc' that dsbuild did not make"),
    ("latest-links-to-a-users-directory", link_to_a_users_directory, [], "symbolic link to 'mydata' that dsbuild did not make"),
    ("latest-links-into-a-subdirectory", link_into_a_subdirectory, [], "symbolic link to 'runs/r0' that dsbuild did not make"),
    ("latest-links-to-a-file", link_to_a_file, [], "symbolic link to 'notes' that dsbuild did not make"),
    ("run-directory-named-latest", lambda build: None, ["--out", "build/latest"], "the run directory build/latest is named 'latest'"),
]


def _listing(build: Path) -> dict[str, str]:
    out = {}
    for p in sorted(build.rglob("*")):
        rel = p.relative_to(build).as_posix()
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else "file"
    return out


@pytest.mark.parametrize("name,make,args,words", [pytest.param(*c, id=c[0]) for c in REFUSED])
def test_latest_that_dsbuild_did_not_make_is_refused_before_any_stage(dsbuild, tmp_path, name, make, args, words):
    build = tmp_path / "build"
    build.mkdir()
    make(build)
    before, contents = _listing(build), snapshot(build)
    proc = dsbuild("run", *(args or ["--out", "build/r"]), timeout=300)
    message = assert_one_sentence(proc, name)
    assert proc.returncode == 2, proc.stderr
    assert words in message, message
    assert _listing(build) == before and snapshot(build) == contents  # nothing replaced, no .latest.tmp-*
    assert not (build / "r").exists(), "a stage ran before the refusal"
    record.add("bad_inputs", name, exit_code=proc.returncode, message=message, item=8)


def test_links_dsbuild_made_are_replaced_and_a_rerun_through_latest_keeps_it(dsbuild, tmp_path):
    """A dangling link dsbuild made (its run removed) is repointed; ``--out build/latest`` rebuilds that run."""
    build = tmp_path / "build"
    build.mkdir()
    (build / "latest").symlink_to("removed-run")
    proc = dsbuild("run", "--out", "build/r", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(build / "latest") == "r"
    proc = dsbuild("run", "--out", "build/latest", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(build / "latest") == "r" and (build / "r" / "manifest.json").is_file()
    assert sorted(p.name for p in build.iterdir()) == ["latest", "r"]
    record.add("checks", "latest-made-by-dsbuild-is-replaced", item=8,
               detail="a dangling dsbuild link repointed; a run through --out build/latest keeps the link")
