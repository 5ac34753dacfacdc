"""The throughput/latency trade-off across layouts as a PNG (written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from builder.atomic import atomic_write_bytes
from builder.plan.explain import distinct_layouts
from builder.plan.result import PlanResult

GIB = 1 << 30
DPI = 110
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def plot_plan(result: PlanResult, path: str | Path, *, label_top: int = 8) -> Path:
    """:func:`plan_figure` as a PNG at ``path`` (written atomically)."""
    import matplotlib.pyplot as plt

    fig = plan_figure(result, label_top=label_top)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plan_figure(result: PlanResult, *, label_top: int = 8):
    """Left: tok/s/user vs tok/s/GPU of every feasible layout, the Pareto front drawn, the recommendation and
    the requested layout marked, the ``label_top`` best named. Right: memory per GPU of the top layouts, broken
    down. A matplotlib Figure laid out at the DPI the PNG is written with (label placement is measured in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feasible = distinct_layouts(result)  # EP variants with identical predictions drawn once
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), dpi=DPI, gridspec_kw={"width_ratios": [3, 2]})
    c = result.cluster
    fig.suptitle(f"{result.model}: {c.nodes}x{c.gpus_per_node} {c.gpu.name} ({c.network.name}), {result.quant}, "
                 f"isl {result.workload.isl}/osl {result.workload.osl}, {result.workload.concurrency} concurrent")
    if feasible:
        xs = [lp.tokens_per_s_per_user for lp in feasible]
        ys = [lp.tokens_per_s_per_gpu for lp in feasible]
        colors = ["tab:orange" if lp.layout.attention_dp else "tab:blue" for lp in feasible]
        sizes = [20 + 10 * lp.layout.pp for lp in feasible]
        ax.scatter(xs, ys, c=colors, s=sizes, alpha=0.7)
        ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
        front, best = [], -1.0
        for lp in sorted(feasible, key=lambda p: -p.tokens_per_s_per_user):
            if lp.tokens_per_s_per_gpu > best:
                front.append(lp)
                best = lp.tokens_per_s_per_gpu
        front_xy = ([p.tokens_per_s_per_user for p in front], [p.tokens_per_s_per_gpu for p in front])
        ax.plot(*front_xy, "k--", lw=1, label="Pareto front")
        rec = result.recommended
        if rec is not None:
            ax.scatter([rec.tokens_per_s_per_user], [rec.tokens_per_s_per_gpu], marker="*", s=250, c="tab:red",
                       label=f"recommended {rec.name}", zorder=5)
        req = result.requested
        if req is not None and req.feasible and req is not rec:
            ax.scatter([req.tokens_per_s_per_user], [req.tokens_per_s_per_gpu], marker="s", s=90,
                       facecolors="none", edgecolors="tab:green", label=f"requested {req.name}", zorder=5)
        ax.scatter([], [], c="tab:blue", label="attention-TP")
        ax.scatter([], [], c="tab:orange", label="attention-DP")
        ax.legend(fontsize=8, loc="best")
        marks = [(x, y, s ** 0.5) for x, y, s in zip(xs, ys, sizes)]
        marks += [(p.tokens_per_s_per_user, p.tokens_per_s_per_gpu, 16) for p in (rec, req) if p is not None]
        # The recommended and requested layouts are named in the legend, beside their own markers.
        labels = [(lp.name, lp.tokens_per_s_per_user, lp.tokens_per_s_per_gpu) for lp in feasible[:label_top]
                  if lp is not rec and lp is not req]
    else:
        ax.text(0.5, 0.5, "no feasible layout", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("output tokens/s per user (1 / TPOT)")
    ax.set_ylabel("output tokens/s per GPU")
    ax.grid(alpha=0.3)

    top = (feasible or [lp for lp in result.layouts if lp.weights_per_stage])[:8]
    names = [lp.name for lp in top]
    parts = ("weights", "kv_cache", "activations", "reserve")
    bottom = [0.0] * len(top)
    for part, color in zip(parts, ("tab:gray", "tab:green", "tab:purple", "tab:olive")):
        vals = [(lp.to_dict()["memory_per_gpu_gib"] or {}).get(part, 0.0) for lp in top]
        bx.barh(names, vals, left=bottom, color=color, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    bx.axvline(c.gpu.memory_gib, color="k", lw=1, ls=":", label=f"{c.gpu.name} memory")
    bx.set_xlabel("GiB per GPU (fullest pipeline stage)")
    bx.set_ylim(max(len(top), 4) - 0.5, -0.5)  # best on top; a short list keeps bars of the usual height
    bx.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    if feasible:  # placed in the final layout: tight_layout moves the axes, and with them the points
        _label(ax, fig, labels, obstacles=marks, lines=[front_xy])
    return fig


# Where a label may go relative to its point, in points (dx, dy, horizontal alignment), nearest first; the larger
# offsets get a thin leader line back to the point.
_PLACES = [(6, 3, "left"), (6, -11, "left"), (-6, 3, "right"), (-6, -11, "right"), (0, 9, "center"),
           (0, -17, "center"), (14, 14, "left"), (-14, 14, "right"), (14, -22, "left"), (-14, -22, "right"),
           (24, 26, "left"), (-24, 26, "right"), (24, -34, "left"), (-24, -34, "right")]


def _label(ax, fig, points: list[tuple[str, float, float]], *, obstacles: list[tuple[float, float, float]] = (),
           lines: list[tuple[list[float], list[float]]] = ()) -> None:
    """Name points so that no label covers another label, a marker, a drawn line or the legend, and none leaves the
    axes: each label takes the first free place of ``_PLACES`` around its point (measured with the renderer after
    layout); when none is free it takes the least crowded. ``obstacles``: (x, y, size in points) of markers."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    fx0, fy0, fx1, fy1 = ax.get_window_extent(renderer).extents
    taken = [_box_around(ax, x, y, size) for x, y, size in obstacles]
    for xs, ys in lines:  # a drawn line as small boxes along it
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), list(zip(xs, ys))[1:]):
            for t in [i / 16 for i in range(17)]:
                taken.append(_box_around(ax, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, 2))
    legend = ax.get_legend()
    if legend is not None:  # pinned where "best" put it: a later draw would count the labels and move it onto one
        box = legend.get_window_extent(renderer)
        legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))
        taken.append(tuple(box.extents))
    for name, x, y in dict.fromkeys(points):
        best = None
        for dx, dy, ha in _PLACES:
            far = abs(dx) > 10 or abs(dy) > 20
            note = ax.annotate(name, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points", ha=ha,
                               arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if far else None)
            box = note.get_window_extent(renderer).expanded(1.04, 1.15).extents
            overlap = sum(_overlap(box, t) for t in taken)
            outside = not (fx0 <= box[0] and box[2] <= fx1 and fy0 <= box[1] and box[3] <= fy1)
            score = (outside, overlap)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, note, box)
            else:
                note.remove()
            if score == (False, 0):
                break
        taken.append(best[2])


def _box_around(ax, x: float, y: float, size_pt: float) -> Box:
    px, py = ax.transData.transform((x, y))
    half = size_pt / 2 * ax.figure.dpi / 72
    return (px - half, py - half, px + half, py + half)


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0
