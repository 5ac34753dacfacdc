"""CalibrationProgress: a line per tenth of a pass in logs, a tqdm bar on a terminal; both say prompts, tokens, ETA."""

from __future__ import annotations

import io
import re
import time

from quantize.calib import CalibrationProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_with_tokens_and_eta():
    lines: list[str] = []
    with CalibrationProgress("calibrate x pass 1 of 2", prompts=25, tokens_per_prompt=64, log=lines.append,
                             stream=io.StringIO()) as bar:
        for _ in range(25):
            bar.step()
    pattern = re.compile(r"^calibrate x pass 1 of 2: (\d+)/25 prompts, (\d+)/1600 tokens, \d+ s, ETA \d+ s$")
    done = [int(pattern.match(line).group(1)) for line in lines]
    assert done == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]  # the first prompt at or past each tenth
    assert [int(pattern.match(line).group(2)) for line in lines] == [64 * d for d in done]
    assert lines[-1].endswith("ETA 0 s")


def test_fewer_prompts_than_tenths_gives_a_line_each():
    lines: list[str] = []
    with CalibrationProgress("c", prompts=3, tokens_per_prompt=8, log=lines.append, stream=io.StringIO()) as bar:
        for _ in range(3):
            bar.step()
    assert [line.split(",")[0] for line in lines] == ["c: 1/3 prompts", "c: 2/3 prompts", "c: 3/3 prompts"]


def test_a_terminal_gets_a_bar_with_tokens_and_eta():
    term, lines = Terminal(), []
    with CalibrationProgress("calibrate int4-awq pass 2 of 2", prompts=4, tokens_per_prompt=32, log=lines.append,
                             stream=term) as bar:
        for _ in range(4):
            time.sleep(0.15)  # past tqdm's 0.1 s between refreshes
            bar.step()
    out = term.getvalue()
    assert lines == []  # the bar replaces the lines
    assert "calibrate int4-awq pass 2 of 2" in out and "4/4" in out and "128 tokens" in out and "prompt/s" in out
    assert re.search(r"<\d\d:\d\d", out)  # tqdm's remaining-time estimate
