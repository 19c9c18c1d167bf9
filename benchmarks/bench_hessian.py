"""The Hessian engine side by side with PyHessian, hessian-eigenthings and curvlinops.

Each setting runs in a fresh worker process (``hessian_worker``) with the same thread count
for every library; inside it the libraries alternate within every repeat, so a burst of
load from elsewhere on the machine hits them alike. This module prints the tables and the
issue's goals next to the measured ratios. Times are printed, never asserted.

Environment: HESSWEEP_BENCH_THREADS (threads for every library, default 1),
HESSWEEP_BENCH_SETTINGS (e.g. ``digits``; default both), HESSWEEP_BENCH_REUSE=1 (render the
report from the raw results of the last run in runs/bench/ instead of measuring again).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.hessian_setups import SETTINGS
from benchmarks.measure import machine_line, worker_env

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Hessian engine vs PyHessian / hessian-eigenthings / curvlinops"

TASK_NAMES = {
    "grad": "one gradient",
    "hvp": "one HVP",
    "top1": "top-1 eigenvalue",
    "top10": "top-10 eigenvalues",
    "trace": "trace",
    "input": f"input-Hessian top eigenvalue, {1000} samples",
}


# Raw results (git-ignored; the report is re-rendered from them); HESSWEEP_BENCH_RESULTS moves them.
RESULTS = Path(os.environ.get("HESSWEEP_BENCH_RESULTS", ROOT / "runs" / "bench"))


def run_worker(setting: str, out: Path) -> dict[str, Any]:
    """Measure one setting in a fresh process (or, with HESSWEEP_BENCH_REUSE=1, reuse the
    results of the last run) and return its results."""
    if os.environ.get("HESSWEEP_BENCH_REUSE") != "1" or not out.exists():
        cmd = [sys.executable, "-m", "benchmarks.hessian_worker", setting, str(out)]
        subprocess.run(cmd, cwd=ROOT, env=worker_env(), check=True)
    with open(out) as f:
        return json.load(f)


def median(times: list[float]) -> float:
    if not times:
        return math.nan
    t = sorted(times)
    n = len(t)
    return t[n // 2] if n % 2 else 0.5 * (t[n // 2 - 1] + t[n // 2])


def tval(r: dict[str, Any], clock: str) -> float:
    """The median time a ratio uses: CPU seconds (one-thread runs) or wall seconds."""
    return median(r["cpu"] if clock == "cpu" else r["times"])


def fmt_s(t: float) -> str:
    if math.isnan(t):
        return "-"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def fmt_e(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1e}"


def ratio(peer: dict[str, Any], ours: dict[str, Any], clock: str) -> tuple[float, str]:
    """Peer time over our time; a run stopped at its cap gives a lower bound."""
    base = tval(ours, clock)
    if peer.get("capped"):
        r = peer["capped_cpu" if clock == "cpu" else "capped_wall"] / base
        return r, f">= {r:.1f}x"
    r = tval(peer, clock) / base
    return r, f"{r:.2f}x"


def time_cells(r: dict[str, Any]) -> tuple[str, str]:
    if r.get("capped"):
        return f"> {r['capped_wall']:.0f} (stopped)", f"> {r['capped_cpu']:.0f}"
    wall, cpu = fmt_s(median(r["times"])), fmt_s(median(r["cpu"]))
    if r.get("extrapolated"):
        wall += f" (from {r['samples_done']} samples)"
    return wall, cpu


def setting_table(res: dict[str, Any]) -> list[str]:
    info, rows = res["info"], res["rows"]
    clock = info["clock"]
    by = {(r["task"], r["key"]): r for r in rows}
    mem = info["memory"]
    plan = info["plan"]
    out = [
        f"### {info['title']}",
        "",
        f"{info['n_params']:,} parameters; {info['note']}. Device: {info.get('device', 'cpu')}; "
        f"CPU threads: {info['threads']}; "
        f"repeats: products {plan['hvp_repeats']}, solvers up to {plan['repeats']} (one when "
        f"a run takes > 20 s); ratios on {clock} seconds; worker {info['seconds']:.0f} s wall.",
        "",
        "| task | method | settings | wall s | CPU s | n | peer / ours | rel. error | HVPs "
        f"| peak extra {info.get('memory_kind', 'RSS')} MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    grad = by.get(("grad", "torch"))
    for task in TASK_NAMES:
        task_rows = [r for r in rows if r["task"] == task]
        ours = by.get((task, "ours")) or by.get((task, "batched")) or grad
        for r in task_rows:
            if task == "grad":
                rat = "(baseline)"
            elif task == "hvp":
                rat = f"{tval(r, clock) / tval(grad, clock):.2f}x grad"
            elif r is ours:
                rat = "1"
            else:
                rat = ratio(r, ours, clock)[1]
            settings = r.get("settings", "")
            if task == "hvp":
                settings = "one product over all samples"
                first = r.get("first_s", r.get("first_cpu_s"))
                if first is not None:
                    settings += (
                        f" (after the first, which keeps the gradient graph: "
                        f"{first:.3f} {'CPU' if clock == 'cpu' else 'wall'} s)"
                    )
            if task == "grad":
                settings = "mean loss over the same batches, eval mode"
            peak = "-" if not mem or r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
            n_hvp = "-" if r.get("n_hvp") is None else str(r["n_hvp"])
            wall, cpu = time_cells(r)
            out.append(
                f"| {TASK_NAMES[task]} | {r['label']} | {settings} | {wall} | {cpu} | "
                f"{len(r['times'])} | {rat} | {fmt_e(r.get('rel_err'))} | {n_hvp} | {peak} |"
            )
    out += ["", *reference_notes(info)]
    if "error" in info:
        out.append(f"**The worker stopped early: {info['error']}** (rows above are complete).")
    return out


def reference_notes(info: dict[str, Any]) -> list[str]:
    notes = []
    ref = info.get("ref_top")
    if ref:
        notes.append(
            f"- Reference top-10 ({ref['method']}, {ref['n_matvecs']} products, "
            f"{ref['seconds']:.0f} s): "
            + ", ".join(f"{v:.6g}" for v in ref["eigenvalues"])
            + f". Certificate: max ||Hx - lambda x|| / lambda = {ref['max_residual_rel']:.1e}. "
            f"Smallest eigenvalue (float32, informative) {ref['lambda_min']:.4g}."
        )
    x = info.get("xcheck_top")
    if x:
        tail = f": max rel. difference {x['max_rel_diff']:.1e}" if "max_rel_diff" in x else ""
        notes.append(f"- Cross-check of the reference top-10: {x['method']}{tail}.")
    t = info.get("ref_trace")
    if t:
        notes.append(f"- Reference trace: {t['method']} = {t['value']:.6g}.")
    i = info.get("ref_input")
    if i:
        line = f"- Reference input-Hessian eigenvalues: {i['method']}"
        xi = info.get("xcheck_input")
        if xi:
            line += (
                f"; against {xi['method']}: max |difference| / max eigenvalue "
                f"{xi['max_abs_diff_over_max']:.1e}"
            )
        notes.append(line + ".")
    notes.append(
        "- rel. error: HVP ||Hv - Hv_ref|| / ||Hv_ref||; top-k max_i |l_i - ref_i| / |ref_i| "
        "(descending order); trace |t - ref| / |ref|; input: max over samples of "
        "|l - ref| / max(|ref|, 1e-3 max|ref|) (confidently classified samples have top "
        "eigenvalues float32 cannot resolve). HVPs: products the method made (a stopped run: "
        "until it stopped)."
    )
    return notes


def verdict(ok: bool, peer: dict[str, Any], r: float, need: float) -> str:
    """PASS/MISS; a stopped peer whose lower bound falls short of the goal decides nothing."""
    if ok:
        return "PASS"
    if peer.get("capped") and r < need:
        return f"UNDECIDED (stopped at >= {r:.1f}x)"
    return "MISS"


def goals(results: dict[str, dict[str, Any]]) -> list[str]:
    out = [
        "### Goals (issue 2) next to the measured ratios",
        "",
        "| goal | setting | measured | result |",
        "|---|---|---|---|",
    ]
    for name, res in results.items():
        by = {(r["task"], r["key"]): r for r in res["rows"]}
        clock = res["info"]["clock"]
        tag = "(a)" if name == "digits" else "(b)"

        def have(*keys: tuple[str, str], by=by) -> bool:
            return all(k in by and (by[k]["times"] or by[k].get("capped")) for k in keys)

        if have(("grad", "torch"), ("hvp", "ours")):
            rr = tval(by[("hvp", "ours")], clock) / tval(by[("grad", "torch")], clock)
            out.append(
                f"| HVP <= 2.5x one gradient | {tag} | {rr:.2f}x | "
                f"{'PASS' if rr <= 2.5 else 'MISS'} |"
            )
        if have(("top1", "ours"), ("top1", "pyhessian")):
            o1, p1 = by[("top1", "ours")], by[("top1", "pyhessian")]
            r1, txt = ratio(p1, o1, clock)
            ok = o1.get("rel_err", math.inf) <= 1e-4 and r1 >= 2
            out.append(
                f"| top-1 to 1e-4 rel. error, >= 2x faster than PyHessian "
                f"eigenvalues(top_n=1) at its defaults | {tag} | {txt}; error ours "
                f"{fmt_e(o1.get('rel_err'))}, PyHessian {fmt_e(p1.get('rel_err'))} | "
                f"{verdict(ok, p1, r1, 2)} |"
            )
        for key, need, who in (
            ("pyhessian", 5, "PyHessian"),
            ("curvlinops", 2, "curvlinops + eigsh"),
        ):
            if not have(("top10", "ours"), ("top10", key)):
                continue
            o10, p = by[("top10", "ours")], by[("top10", key)]
            rk, txt = ratio(p, o10, clock)
            e_ours, e_peer = o10.get("rel_err", math.inf), p.get("rel_err", math.inf)
            # equal or better accuracy: ours no worse than the peer's, or within 1e-4 anyway
            ok = rk >= need and e_ours <= max(e_peer, 1e-4)
            if p.get("capped"):
                txt += f" (its run was stopped after {p['n_hvp']} products)"
            out.append(
                f"| top-10 >= {need}x faster than {who} at equal or better accuracy | {tag} | "
                f"{txt}; max rel. error ours {fmt_e(e_ours)}, {who} {fmt_e(e_peer)} | "
                f"{verdict(ok, p, rk, need)} |"
            )
        out.extend(input_goals(res["rows"], by, tag, clock))
    return out


def input_goals(rows: list[dict[str, Any]], by: dict, tag: str, clock: str) -> list[str]:
    """Batched input Hessians against the fastest per-sample loop, per method: each batched
    run is set against the loops of its own method and the dense loop."""
    out = []
    for key, method in (("batched", "lanczos"), ("batched_jacobian", "jacobian")):
        batched = by.get(("input", key))
        loops = [
            r
            for r in rows
            if r["task"] == "input"
            and not r["key"].startswith("batched")
            and r.get("method", method) == method
        ]
        if not batched or not batched["times"] or not loops or not all(r["times"] for r in loops):
            continue
        fastest = min(loops, key=lambda r: tval(r, clock))
        rb = tval(fastest, clock) / tval(batched, clock)
        which = "" if method == "lanczos" else f" (method='{method}', opt-in)"
        out.append(
            f"| batched input Hessian >= 20x faster than a per-sample loop{which} | {tag} | "
            f"{rb:.1f}x vs the faster loop ({fastest['label']}) | "
            f"{'PASS' if rb >= 20 else 'MISS'} |"
        )
    return out


def run() -> str:
    """Run both settings (or those in HESSWEEP_BENCH_SETTINGS) and return the report."""
    t0 = time.perf_counter()
    start = machine_line()
    chosen = os.environ.get("HESSWEEP_BENCH_SETTINGS", ",".join(SETTINGS)).split(",")
    results = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        print(f"[bench_hessian] setting {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(name, RESULTS / f"hessian-{name}.json")
    first = next(iter(results.values()))["info"]
    lines = [
        f"## {TITLE}",
        "",
        f"Machine at start: {start}; at end: {machine_line().rsplit(', ', 1)[-1]}. "
        f"torch {first['torch']}; total {time.perf_counter() - t0:.0f} s. Each setting runs in "
        "a fresh worker process; within a repeat the libraries take turns (ours first), so "
        "load from elsewhere hits them alike. With one thread, ratios use CPU seconds of "
        "the process (what the work costs, unaffected by other processes on the machine); "
        "wall seconds are shown too. "
        + (
            "On a GPU, ratios use wall seconds with the device synchronised around each "
            "call, and peak memory is the CUDA allocator's peak during a call minus what "
            "was allocated before it."
            if first.get("device", "cpu") != "cpu"
            else "Peak memory: the extra resident memory of one call, i.e. the RSS "
            "high-water mark (VmHWM, reset before the call through /proc/self/clear_refs) "
            "minus the RSS before it, after malloc_trim(0) has handed memory freed by "
            "earlier calls back to the OS."
        ),
        "",
    ]
    for res in results.values():
        lines += [*setting_table(res), ""]
    lines += goals(results)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    print(run())
