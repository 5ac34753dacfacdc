"""Runs INSIDE the aiconfigurator venv (never imported by dsbuild): weight memory and KV capacity from
aiconfigurator's own memory model, decode step time (TPOT) from its `estimate --estimate-mode static_gen`.
Reads a JSON list of cases from argv[1], prints a JSON list of results."""

import json
import re
import subprocess
import sys
from pathlib import Path

from aiconfigurator_core.sdk.memory import estimate_kv_cache

GIB = 1 << 30


def probe(case):
    out = {}
    adp = case.get("adp", 1)
    par = dict(tp_size=case["tp"], pp_size=case["pp"], attention_dp_size=case.get("adp", 1),
               moe_tp_size=case["tp"] // case["ep"] if adp == 1 else 1, moe_ep_size=case["ep"])
    try:
        if case.get("skip_memory"):
            raise LookupError("memory not asked for")
        kv = estimate_kv_cache(case["model"], case["system"], "trtllm", case.get("version", "1.3.0rc20"),
                               max_num_tokens=8192,
                               max_batch_size=case["batch"], memory_fraction_kind="of_free",
                               memory_fraction_value=0.9, kvcache_quant_mode="fp8", **par)
        mb = kv["memory_breakdown"]
        out.update(weights_gib=mb["weights_bytes"] / GIB, activations_gib=mb["activations_bytes"] / GIB,
                   other_gib=(mb["runtime_overhead_bytes"] + mb["comm_overhead_bytes"]) / GIB,
                   kv_tokens=kv["total_kv_size_tokens"], kv_bytes_per_token=kv["kv_size_per_token_bytes"],
                   capacity_gib=kv["total_gpu_capacity_bytes"] / GIB)
    except LookupError:
        pass
    except Exception as exc:  # reported, not hidden: the comparison prints it
        out["memory_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    cli = [str(Path(sys.executable).parent / "aiconfigurator"), "cli", "estimate", "--model-path", case["model"],
           "--system", case["system"], "--backend", "trtllm", "--estimate-mode", "static_gen",
           "--isl", str(case["isl"]), "--osl", str(case["osl"]), "--batch-size", str(case["batch"]),
           "--tp-size", str(case["tp"]), "--pp-size", str(case["pp"]), "--moe-ep-size", str(case["ep"]),
           "--moe-tp-size", str(par["moe_tp_size"]), "--attention-dp-size", str(par["attention_dp_size"]),
           "--kvcache-quant-mode", case.get("kv", "fp8")]
    for flag in ("gemm", "moe", "fmha"):
        if case.get(flag):
            cli += [f"--{flag}-quant-mode", case[flag]]
    res = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    m = re.search(r"TPOT:\s+([\d.,]+) ms", res.stdout + res.stderr)
    if m:
        out["tpot_ms"] = float(m.group(1).replace(",", ""))
    else:
        err = [ln for ln in (res.stdout + res.stderr).splitlines() if "rror" in ln]
        out["tpot_error"] = (err[-1] if err else "no TPOT in output")[:200]
    return out


if __name__ == "__main__":
    print(json.dumps([probe(c) for c in json.loads(sys.argv[1])]))
