"""plan.png: every layout label is readable. Measured on the drawn figure with matplotlib's own geometry (text
extents, scatter offsets and sizes, the legend's box, the Pareto line's path), not with the placer's bookkeeping."""

from __future__ import annotations

import math

import pytest

from builder.plan.search import plan_cluster
from builder.plan import plot
from builder.plan.plot import plan_figure

CASES = {
    # the commands of README.md and docs/choosing-a-layout.md, and the densest table: 72 GPUs of one GB200 rack
    "readme-h100x16": dict(model="deepseek-v3.2", gpu="h100-sxm", nodes=2, network="ib-ndr", isl=4096, osl=1024,
                           concurrency=128, tpot_ms=50),
    "readme-h200x16": dict(model="deepseek-v3.2", gpu="h200-sxm", nodes=2),
    "gb200-rack": dict(model="deepseek-v3.2", gpu="gb200", nodes=1),
    "h200x32": dict(model="deepseek-v3.2", gpu="h200-sxm", nodes=4),
}


def _collisions(fig) -> list[str]:
    """What a label covers in the figure as it is written: another label, a marker, the Pareto line, the legend,
    or the edge of the axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    problems = []
    for i, (name, box) in enumerate(labels):
        if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
            problems.append(f"{name} leaves the axes")
        for other, obox in labels[i + 1:]:
            if box.overlaps(obox):
                problems.append(f"{name} covers {other}")
        legend = ax.get_legend().get_window_extent(renderer)
        if box.overlaps(legend):
            problems.append(f"{name} covers the legend")
        for coll in ax.collections:
            offsets = coll.get_offsets()
            sizes = coll.get_sizes()
            for k, (x, y) in enumerate(offsets):
                px, py = ax.transData.transform((x, y))
                radius = math.sqrt(sizes[k % len(sizes)]) / 2 * fig.dpi / 72
                nx, ny = min(max(px, box.x0), box.x1), min(max(py, box.y0), box.y1)  # nearest point of the box
                if math.hypot(px - nx, py - ny) < radius:
                    problems.append(f"{name} covers the marker at ({x:.1f}, {y:.1f})")
        for line in ax.lines:
            xs, ys = line.get_data()
            pts = [ax.transData.transform((x0 + (x1 - x0) * t / 50, y0 + (y1 - y0) * t / 50))
                   for (x0, y0), (x1, y1) in zip(zip(xs, ys), list(zip(xs, ys))[1:]) for t in range(51)]
            if any(box.contains(px, py) for px, py in pts):
                problems.append(f"{name} covers the {line.get_label()} line")
    return problems


@pytest.mark.parametrize("case", list(CASES))
def test_plan_labels_cover_nothing(case):
    result = plan_cluster(**CASES[case])
    fig = plan_figure(result)
    ax = fig.axes[0]
    named = {t.get_text() for t in ax.texts}
    assert len(named) == len(ax.texts) >= min(7, sum(lp.feasible for lp in result.layouts) - 1), named
    assert _collisions(fig) == []
    # the legend stays where it was measured: drawing again (as savefig does) must not move it onto a label
    before = ax.get_legend().get_window_extent().extents.tolist()
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().extents.tolist() == before


def test_the_check_sees_labels_that_cover_each_other(monkeypatch):
    """The same check against a placer that may only put a label right of its point (the old behaviour): the dense
    rack plan then has labels on markers and on each other, and the check says so."""
    monkeypatch.setattr(plot, "_PLACES", [(4, 3, "left")])
    problems = _collisions(plan_figure(plan_cluster(**CASES["gb200-rack"])))
    assert any("covers tp" in p for p in problems) and any("marker" in p for p in problems), problems


def test_plot_plan_writes_a_png(tmp_path):
    path = plot.plot_plan(plan_cluster(**CASES["readme-h200x16"]), tmp_path / "plan.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.png"]


def test_no_feasible_layout_is_said_on_a_bare_plot():
    fig = plan_figure(plan_cluster(model="deepseek-v3.2", gpu="l40s", nodes=1))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["no feasible layout"]
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
