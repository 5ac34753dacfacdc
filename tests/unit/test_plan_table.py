"""The plan table shows each layout's note whole (wrapped at words inside its column), never cut mid-word."""

from __future__ import annotations

from builder.plan.explain import distinct_layouts, render_table
from builder.plan.search import plan_cluster


def test_every_note_is_shown_whole(capsys):
    # docs/choosing-a-layout.md's command: its notes include the longest warning (TP spanning nodes)
    result = plan_cluster(model="deepseek-v3.2", gpu="h100-sxm", nodes=2, network="ib-ndr", isl=4096, osl=1024,
                          concurrency=128, tpot_ms=50)
    render_table(result)
    out = capsys.readouterr().out
    cells = [line.split("│")[-2].strip() for line in out.splitlines() if line.count("│") > 2]
    shown = " ".join(c for c in cells if c)
    notes = [(lp.reasons[:1] or lp.warnings[:1])[0] for lp in distinct_layouts(result)[:15]
             if lp.reasons or lp.warnings]
    assert any(len(n) > 70 for n in notes), notes  # the case the old 70-character cut broke
    for note in notes:
        assert note in shown, note
