"""The run lock: a directory created for a run that completed nothing is removed again (with the parents created
for it); anything else stays; a process waiting on a lock whose directory was removed locks the new one."""

from __future__ import annotations

import threading
import time

import pytest

from builder.errors import RunLockedError, SpecError
from builder.pipeline import run_lock
from builder.rundir import LOCK


def test_a_refused_run_leaves_nothing(tmp_path):
    run = tmp_path / "build" / "r"
    with pytest.raises(SpecError):
        with run_lock(run):
            assert (run / LOCK).is_file()
            raise SpecError("refused")
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_wrote_something_stays(tmp_path):
    run = tmp_path / "r"
    with pytest.raises(SpecError):
        with run_lock(run):
            (run / "plan").mkdir()
            raise SpecError("later stage failed")
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "plan"]


def test_an_existing_directory_is_never_removed(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with run_lock(run):
        pass
    assert [p.name for p in run.iterdir()] == [LOCK]
    parent = tmp_path / "p"
    parent.mkdir()
    with run_lock(parent / "r"):
        pass
    assert parent.is_dir() and list(parent.iterdir()) == []


def test_a_second_process_is_refused_while_the_first_holds_it(tmp_path):
    run = tmp_path / "r"
    with run_lock(run):
        with pytest.raises(RunLockedError, match="another dsbuild process"):
            with run_lock(run):
                pass
    assert not run.exists()


def test_a_waiter_locks_the_directory_that_exists_after_the_first_removed_its_own(tmp_path):
    run = tmp_path / "r"
    entered, done = threading.Event(), []

    def waiter():
        entered.wait()
        with run_lock(run, wait=True):  # opens the first holder's lock file, then blocks on it
            assert (run / LOCK).is_file()
            (run / "plan").mkdir()
            done.append(True)

    t = threading.Thread(target=waiter)
    t.start()
    with run_lock(run):
        entered.set()
        time.sleep(0.5)
    t.join(10)
    assert done == [True]
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "plan"]
