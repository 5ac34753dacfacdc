"""Words for a plan: why the recommended layout beats the next one, and a readable table."""

from __future__ import annotations

from collections import Counter

from builder.plan.result import LayoutPlan, PlanResult

GIB = 1 << 30


def _describe(lp: LayoutPlan) -> str:
    lay = lp.layout
    parts = [f"TP {lay.tp}"]
    if lay.pp > 1:
        parts.append(f"PP {lay.pp}")
    if lay.ep > 1:
        parts.append(f"EP {lay.ep}")
    if lay.attention_dp:
        parts.append("attention-DP")
    if lp.replicas > 1:
        parts.append(f"{lp.replicas} replicas")
    return " x ".join(parts[:1]) + ("" if len(parts) == 1 else ", " + ", ".join(parts[1:]))


def _why_better(a: LayoutPlan, b: LayoutPlan) -> str:
    """The term of the decode step (or the capacity) that separates ``a`` from ``b``."""
    if not b.feasible:
        return f"{b.name} is not feasible ({b.reasons[0]})"
    if a.meets_slo and not b.meets_slo:
        return f"{b.name} misses the latency limits ({b.warnings[-1]})"
    if any("fewer than the" in w for w in b.warnings) and b.batch * b.replicas < a.batch * a.replicas:
        return (f"{b.name}'s KV cache holds only {b.max_seqs_replica * b.replicas} sequences "
                f"(vs {a.max_seqs_replica * a.replicas}), which caps its batch")
    if any("to meet TPOT" in w for w in b.warnings) and b.batch * b.replicas < 0.9 * a.batch * a.replicas:
        return (f"at the TPOT limit {b.name} runs {b.batch * b.replicas} sequences at a time where "
                f"{a.name} runs {a.batch * a.replicas} (its step grows faster with the batch)")

    def per_step(lp, attr):  # the slowest stage's term, times the micro-batches it runs per decode step
        worst = max(lp.decode.stages, key=lambda s: s.ms)
        value = worst.comm.ms if attr == "comm" else getattr(worst, attr)
        return value * lp.decode.microbatches

    terms = {name: (per_step(a, attr), per_step(b, attr)) for name, attr in (
        ("reading weights", "weights_ms"), ("reading the KV cache", "kv_ms"), ("compute", "compute_ms"),
        ("communication", "comm"), ("latency-bound small kernels", "overhead_ms"))}
    name, (x, y) = max(terms.items(), key=lambda kv: kv[1][1] - kv[1][0])
    why = (f"a decode step ({a.decode.step_ms:.1f} vs {b.decode.step_ms:.1f} ms) spends {x:.2f} ms on {name} "
           f"on its slowest GPU vs {y:.2f} ms for {b.name}")
    if b.layout.pp > 1 and b.decode.microbatches > 1:
        why += f" (whose {b.decode.microbatches} pipeline micro-batches each re-read the stage's weights)"
    if name == "communication":
        why += f" (TP over {a.links.get('tp', 'none').replace('none', 'no link')} vs " \
               f"{b.links.get('tp', 'none').replace('none', 'no link')}" + \
               (f", PP hops over {b.links.get('pp')}" if b.layout.pp > 1 else "") + ")"
    if b.decode.microbatches * b.layout.pp > 1 and b.decode.bubble > 0.05:
        why += f"; {b.name} also idles {b.decode.bubble:.0%} of each step in pipeline bubbles"
    return why


def _same_speed(a: LayoutPlan, b: LayoutPlan) -> bool:
    return abs(a.tokens_per_s_per_gpu - b.tokens_per_s_per_gpu) <= 0.005 * max(a.tokens_per_s_per_gpu, 1e-9) \
        and abs(a.tokens_per_s_per_user - b.tokens_per_s_per_user) <= 0.005 * max(a.tokens_per_s_per_user, 1e-9)


def rationale(result: PlanResult) -> str:
    rec = result.recommended
    feasible = [lp for lp in result.layouts if lp.feasible]
    if rec is None:
        reasons = Counter(_reason_kind(r) for lp in result.layouts for r in lp.reasons[:1])
        top = "; ".join(f"{n}x {k}" for k, n in reasons.most_common(3))
        first = result.layouts[0].reasons[0] if result.layouts and result.layouts[0].reasons else "no layouts"
        hint = " (no --gpu was given, so this planned for the CPU reference engine; pass --gpu, e.g. h200-sxm)" \
            if result.cluster.gpu.arch == "cpu" else ""
        return f"No layout fits {result.cluster.gpus} x {result.cluster.gpu.name}{hint} ({top}). First: {first}."
    c = result.cluster
    held = "as TensorRT-LLM holds them" if rec.runtime == "tensorrt-llm" else "in the rank files"
    lines = [
        f"Recommended {rec.name} ({_describe(rec)}): {rec.tokens_per_s_per_gpu:.1f} output tok/s/GPU, "
        f"{rec.tokens_per_s_per_user:.1f} tok/s/user at {rec.batch} sequences per replica; "
        f"{max(rec.weights_per_stage) / GIB:.1f} GiB of weights per GPU ({held}) leaves room for "
        f"{rec.max_seqs_replica * rec.replicas} sequences of {result.workload.seq_len} tokens.",
    ]
    if rec.layout.tp > 1 and rec.layout.attention_dp:
        lines.append(f"Attention runs data-parallel on each of the {rec.layout.tp} GPUs (no all-reduces, every GPU "
                     f"caches only its own requests); the MoE dispatch/combine all-to-all goes over "
                     f"{rec.links.get('tp')}.")
    elif rec.layout.tp > 1:
        where = "inside the NVLink domain" if rec.links.get("tp") == "nvlink" else f"over {rec.links.get('tp')}"
        lines.append(f"Its TP all-reduces stay {where} ({c.gpus_per_node} GPUs per node).")
    if rec.layout.pp > 1:
        split = "/".join(str(len(s)) for s in rec.layout.stage_layers(result.cfg.num_hidden_layers))
        lines.append(f"PP {rec.layout.pp} splits the {result.cfg.num_hidden_layers} layers {split} (MTP on the "
                     f"last stage); stage hand-offs go over {rec.links.get('pp')}.")
    ties = [lp for lp in feasible[1:] if _same_speed(lp, rec)]
    if ties:
        lines.append(f"{', '.join(lp.name for lp in ties[:4])}{' ...' if len(ties) > 4 else ''} predict the same "
                     "speed (EP only moves whole experts between ranks of the TP group: the same bytes are read per "
                     "step); the tie goes to less pipelining, then to the larger EP, which keeps every expert's GEMM "
                     "whole as TensorRT-LLM's DeepSeek recipes do.")
    runner = next((lp for lp in feasible[1:] if not _same_speed(lp, rec)), None)
    if runner is not None:
        lines.append(f"Over {runner.name} ({runner.tokens_per_s_per_gpu:.1f} tok/s/GPU, "
                     f"{runner.tokens_per_s_per_user:.1f} tok/s/user): {_why_better(rec, runner)}.")
    infeasible = [lp for lp in result.layouts if not lp.feasible]
    if infeasible:
        kinds = Counter(_reason_kind(lp.reasons[0]) for lp in infeasible)
        lines.append(f"{len(infeasible)} other layout(s) do not fit: "
                     + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + ".")
    return " ".join(lines)


def _reason_kind(reason: str) -> str:
    for key, label in (("out of memory", "out of memory"), ("KV cache holds no", "KV cache too small"),
                       ("needs Blackwell", "format needs Blackwell"), ("needs Hopper", "format needs Hopper"),
                       ("GPUs (TP", "more GPUs than the cluster"), ("FP8 blocks", "split cuts FP8 blocks"),
                       ("does not divide", "divisibility"), ("must divide", "divisibility"),
                       ("does not split", "divisibility"), ("larger than the model", "PP > layers")):
        if key in reason:
            return label
    return "other"


class _Distinct(list):
    twins: dict


def distinct_layouts(result: PlanResult) -> list:
    """Feasible layouts in rank order, EP variants that predict the same numbers as a better-ranked layout with
    the same TP, PP, attention-DP and replicas folded into it (``.twins[layout] = [their EPs]``)."""
    out = _Distinct()
    out.twins = {}
    for lp in result.layouts:
        if not lp.feasible:
            continue
        twin = next((s for s in out if s.layout.tp == lp.layout.tp and s.layout.pp == lp.layout.pp
                     and s.layout.attention_dp == lp.layout.attention_dp and s.replicas == lp.replicas
                     and _same_speed(s, lp)), None)
        if twin is not None and not lp.requested:
            out.twins.setdefault(twin, []).append(lp.layout.ep)
        else:
            out.append(lp)
    return out


def _gib(x: float) -> str:
    return f"{x:.1f}" if x >= 0.1 or x == 0 else f"{x * 1024:.1f}M"


def render_table(result: PlanResult, *, limit: int = 15) -> None:
    """The ranked layouts as a rich table on stderr-free stdout, then the rationale."""
    from rich.console import Console
    from rich.table import Table

    c = result.cluster
    title = (f"{result.model} on {c.nodes}x{c.gpus_per_node} {c.gpu.name} ({c.network.name}), {result.quant} "
             f"weights, {result.kv_cache_dtype} KV, isl {result.workload.isl} / osl {result.workload.osl}, "
             f"{result.workload.concurrency} concurrent")
    table = Table(title=title, title_justify="left", caption="memory in GiB per GPU (M: MiB)")
    for col in ("#", "layout", "GPUs", "weights", "KV", "act+rsv", "max seqs", "batch", "step ms", "TTFT ms",
                "tok/s/GPU", "tok/s/user", "bound", "notes"):
        table.add_column(col, justify="right" if col not in ("layout", "bound", "notes") else "left",
                         max_width=70 if col == "notes" else None)  # a long note wraps at words, never cut
    distinct = distinct_layouts(result)
    shown = [lp for lp in distinct if lp.requested or distinct.index(lp) < limit]
    twins = {id(lp): eps for lp, eps in distinct.twins.items()}
    shown += [lp for lp in result.layouts if lp.requested and lp not in shown]
    for i, lp in enumerate(shown, 1):
        d = lp.to_dict()
        m = d["memory_per_gpu_gib"] or {}
        mark = "*" if lp is result.recommended else ("req" if lp.requested else str(i))
        notes = "; ".join(lp.reasons[:1] or lp.warnings[:1])
        if twins.get(id(lp)):
            notes = f"same for EP {','.join(map(str, twins[id(lp)]))}" + (f"; {notes}" if notes else "")
        table.add_row(mark, lp.name, str(lp.gpus), _gib(m.get("weights", 0)), _gib(m.get("kv_cache", 0)),
                      _gib(m.get("activations", 0) + m.get("reserve", 0)), str(d["max_concurrent_sequences"]),
                      str(lp.batch), f"{d['decode_step_ms']:.2f}" if lp.decode else "-",
                      f"{d['ttft_ms']:.0f}" if lp.prefill else "-", f"{lp.tokens_per_s_per_gpu:.1f}",
                      f"{lp.tokens_per_s_per_user:.1f}", d["bound"] or "-", notes,
                      style=None if lp.feasible else "red")
    console = Console(width=200)
    console.print(table)
    infeasible = len(result.layouts) - sum(lp.feasible for lp in result.layouts)
    console.print(f"{len(result.layouts)} layouts evaluated in {result.elapsed_s * 1e3:.0f} ms; {infeasible} infeasible "
                  "(all of them, with reasons, in --json).")
    console.print(rationale(result), soft_wrap=False)
