"""The throughput/latency trade-off across layouts as a PNG (written atomically)."""

from __future__ import annotations

import io
from pathlib import Path

from builder.atomic import atomic_write_bytes
from builder.plan.explain import distinct_layouts
from builder.plan.result import PlanResult

GIB = 1 << 30


def plot_plan(result: PlanResult, path: str | Path, *, label_top: int = 8) -> Path:
    """Left: tok/s/user vs tok/s/GPU of every feasible layout, the Pareto front drawn, the recommendation and
    the requested layout marked. Right: memory per GPU of the top layouts, broken down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feasible = distinct_layouts(result)  # EP variants with identical predictions drawn once
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    c = result.cluster
    fig.suptitle(f"{result.model}: {c.nodes}x{c.gpus_per_node} {c.gpu.name} ({c.network.name}), {result.quant}, "
                 f"isl {result.workload.isl}/osl {result.workload.osl}, {result.workload.concurrency} concurrent")
    if feasible:
        xs = [lp.tokens_per_s_per_user for lp in feasible]
        ys = [lp.tokens_per_s_per_gpu for lp in feasible]
        colors = ["tab:orange" if lp.layout.attention_dp else "tab:blue" for lp in feasible]
        ax.scatter(xs, ys, c=colors, s=[20 + 10 * lp.layout.pp for lp in feasible], alpha=0.7)
        front, best = [], -1.0
        for lp in sorted(feasible, key=lambda p: -p.tokens_per_s_per_user):
            if lp.tokens_per_s_per_gpu > best:
                front.append(lp)
                best = lp.tokens_per_s_per_gpu
        ax.plot([p.tokens_per_s_per_user for p in front], [p.tokens_per_s_per_gpu for p in front], "k--", lw=1,
                label="Pareto front")
        _label(ax, fig, [(lp.name, lp.tokens_per_s_per_user, lp.tokens_per_s_per_gpu)
                         for lp in feasible[:label_top] + [p for p in feasible if p.requested]])
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
    else:
        ax.text(0.5, 0.5, "no feasible layout", ha="center", va="center", transform=ax.transAxes)
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
    bx.invert_yaxis()
    bx.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _label(ax, fig, points: list[tuple[str, float, float]], *, line_pt: float = 9.0) -> None:
    """Name points without overlapping labels: each label goes right of its point, and moves down a line at a time
    while it would cover one already placed (compared in points, after the axes are laid out)."""
    fig.canvas.draw()
    scale = 72.0 / fig.dpi
    placed: list[tuple[float, float, float]] = []  # x0, x1, y of labels drawn
    for name, x, y in sorted(dict.fromkeys(points), key=lambda p: -p[2]):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width = 4.2 * len(name)
        dy = 3.0
        while any(abs(py + dy - ly) < line_pt and px + 4 < lx1 and lx0 < px + 4 + width for lx0, lx1, ly in placed):
            dy -= line_pt
        placed.append((px + 4, px + 4 + width, py + dy))
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points")
