"""benchmarks/compare_test_time.py reads pytest's own output: per-test durations and the summary line."""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import compare_test_time  # noqa: E402

OUTPUT = """\
============================= slowest durations ==============================
12.50s call     tests/a.py::test_one[x]
0.25s setup    tests/a.py::test_one[x]
3.00s call     tests/b.py::test_one[x]
0.01s teardown tests/b.py::test_two
=========== 1 failed, 653 passed, 2 skipped, 31 warnings in 1018.35s (0:16:58) ===========
"""


def test_durations_sum_per_test_id_and_the_summary_is_found():
    # Same name in two files stays two tests: matching by id, not by name.
    assert compare_test_time.per_test_seconds(OUTPUT) == {"tests/a.py::test_one[x]": 12.75,
                                                          "tests/b.py::test_one[x]": 3.0, "tests/b.py::test_two": 0.01}
    found = [m.group(1) for line in OUTPUT.splitlines() if (m := compare_test_time.SUMMARY.match(line))]
    assert found == ["1 failed, 653 passed, 2 skipped, 31 warnings"]
