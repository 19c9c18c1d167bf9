"""Measure one setting in a fresh process; ``bench_hessian`` starts one per setting.

Usage: ``python -m benchmarks.hessian_worker SETTING OUT.json`` (run from the repo root,
with ``measure.worker_env()``). Progress goes to stderr, results to OUT.json.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from benchmarks import hessian_peers as peers
from benchmarks.hessian_setups import Setting, make_setting
from benchmarks.measure import bench_device, hwm_supported, threads, timed

# Per setting: repeats of the products and of the solver runs, trace probes, a safety cap
# on any one run (wall s) and the wall budget of each per-sample loop (then extrapolated).
PLAN = {
    "digits": {"hvp_repeats": 7, "repeats": 3, "probes": 30, "cap_s": 600.0, "loop_cap_s": 90.0},
    "cifar": {"hvp_repeats": 3, "repeats": 1, "probes": 10, "cap_s": 600.0, "loop_cap_s": 45.0},
}
# On a GPU every run is short, so more repeats; the per-sample loops are capped sooner.
GPU_PLAN = {
    "digits": {"hvp_repeats": 20, "repeats": 3, "probes": 30, "cap_s": 120.0, "loop_cap_s": 15.0},
    "cifar": {"hvp_repeats": 20, "repeats": 3, "probes": 10, "cap_s": 120.0, "loop_cap_s": 15.0},
}
SLOW_RUN_S = 20.0  # after a run this slow, that method is not repeated
N_INPUT = 1000
INPUT_ERR_FLOOR = 1e-3
REF_TOL = 1e-6  # on float64 Ritz residuals; eigenvalue errors are ~ residual^2 / gap
# A peer run is stopped once it has taken this many times our run (its ratio is then a
# lower bound): above the goal where there is one, so each goal is decided.
STOP_AT = {("top1", "pyhessian"): 2.5, ("top10", "pyhessian"): 6.0, ("top10", "curvlinops"): 2.5}
DEFAULT_STOP_AT = 3.0


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rel_err(vals: np.ndarray, ref: np.ndarray) -> float:
    k = len(ref)
    if len(vals) < k:
        return math.inf
    return float(np.max(np.abs(vals[:k] - ref) / np.abs(ref)))


class Recorder:
    def __init__(self, setting: str, memory: bool, cuda: bool = False) -> None:
        self.rows: list[dict[str, Any]] = []
        self.setting = setting
        self.memory = memory
        self.cuda = cuda

    def row(self, task: str, key: str, label: str, **kw: Any) -> dict[str, Any]:
        r = {"task": task, "key": key, "label": label, "times": [], "cpu": [], "peak_mib": None}
        r.update(kw)
        self.rows.append(r)
        return r

    def measure(self, r: dict[str, Any], fn, counter=None, cap_s: float | None = None):
        """Time one run of ``fn`` into row ``r``; returns its value or None when capped."""
        if counter is not None:
            counter.calls = 0
            counter.deadline = None if cap_s is None else time.perf_counter() + cap_s
        try:
            run = timed(fn, self.memory, self.cuda)
        finally:
            if counter is not None:
                counter.deadline = None
        if run.peak_mib is not None:
            r["peak_mib"] = max(r["peak_mib"] or 0.0, run.peak_mib)
        if counter is not None:
            r["n_hvp"] = counter.calls
        if run.error is not None:  # stopped at its cap: keep what it cost so far
            r.update(capped=True, cap_s=cap_s, capped_wall=run.wall, capped_cpu=run.cpu)
            return None
        r["times"].append(run.wall)
        r["cpu"].append(run.cpu)
        return run.value


def references(s: Setting, info: dict[str, Any]) -> dict[str, Any]:
    """Float64 references: top-10 (and extremes), exact trace, per-sample input Hessians."""
    from analysis.hessian import WeightHessian, input_hessian_spectrum, lanczos

    ref: dict[str, Any] = {}
    t0 = time.perf_counter()
    op64 = WeightHessian(s.model, peers.CE, s.batches, dtype=torch.float64)
    res = lanczos(op64, k=10, tol=REF_TOL, seed=1)
    ref["top10"] = res.eigenvalues.cpu().numpy()
    op32 = WeightHessian(s.model, peers.CE, s.batches)
    low = lanczos(op32, k=1, tol=1e-3, seed=1, which="smallest")  # informative only
    info["ref_top"] = {
        "method": f"float64 WeightHessian + lanczos(k=10, tol={REF_TOL:g})",
        "eigenvalues": ref["top10"].tolist(),
        "max_residual_rel": float((res.residuals / res.eigenvalues.abs()).max()),
        "converged": res.converged,
        "n_matvecs": res.n_matvecs,
        "lambda_min": float(low.eigenvalues[0]),
        "seconds": time.perf_counter() - t0,
    }
    log(
        f"reference top-10 {np.round(ref['top10'], 5).tolist()} ({res.n_matvecs} products), "
        f"lambda_min {info['ref_top']['lambda_min']:.4g}"
    )
    ref["op64"] = op64

    t0 = time.perf_counter()
    ref["trace"] = exact_trace(s)
    info["ref_trace"] = {
        "method": "exact float64 Hessian diagonal (BackPACK DiagHessian), summed",
        "value": ref["trace"],
        "seconds": time.perf_counter() - t0,
    }
    log(f"reference trace {ref['trace']:.6g}")

    t0 = time.perf_counter()
    x, y = s.x[:N_INPUT], s.y[:N_INPUT]
    inp = input_hessian_spectrum(
        s.model, peers.CE, x, y, k=1, tol=1e-10, dtype=torch.float64, batch_size=N_INPUT
    )
    ref["input"] = inp.eigenvalues[:, 0].cpu().numpy()
    info["ref_input"] = {
        "method": "float64 batched lanczos (this engine), tol 1e-10",
        "converged": int(inp.converged.sum()),
        "seconds": time.perf_counter() - t0,
    }
    log(f"reference input-Hessian top eigenvalues: median {np.median(ref['input']):.4g}")
    return ref


def exact_trace(s: Setting) -> float:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    model = extend(copy.deepcopy(s.model).double())
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    n = sum(len(x) for x, _ in s.batches)
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in s.batches:
            model.zero_grad()
            with backpack(DiagHessian()):
                loss_fn(model(x.double()), y).backward()
            # BackPACK starts from the loss module's own Hessian (a later scaling of the
            # loss is not seen), so each batch's diagonal is weighted here.
            total += len(x) / n * sum(float(p.diag_h.sum()) for p in model.parameters())
    return total


def cross_checks(s: Setting, ref: dict[str, Any], info: dict[str, Any]) -> None:
    """Independent checks of the references where affordable (setting (a))."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    t0 = time.perf_counter()
    m64 = copy.deepcopy(s.model).double()
    b64 = [(x.double(), y) for x, y in s.batches]
    h = HessianLinearOperator(
        m64, peers.CE, list(m64.parameters()), b64, check_deterministic=False
    ).to_scipy()
    v0 = np.random.default_rng(3).standard_normal(h.shape[0])
    vals = np.sort(eigsh(h, k=10, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False))[::-1]
    info["xcheck_top"] = {
        "method": "curvlinops float64 HVP + scipy eigsh(tol=1e-10): independent HVP and solver",
        "max_rel_diff": rel_err(vals, ref["top10"]),
        "seconds": time.perf_counter() - t0,
    }
    log(
        f"cross-check top-10 (curvlinops f64 + ARPACK): max rel diff "
        f"{info['xcheck_top']['max_rel_diff']:.2e}"
    )

    t0 = time.perf_counter()
    model = copy.deepcopy(s.model).double()
    x, y = s.x[:N_INPUT].double(), s.y[:N_INPUT]

    def per_sample(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(xi[None]), yi[None])

    hs = torch.func.vmap(torch.func.hessian(per_sample))(x, y).detach()
    d = x[0].numel()
    dense = torch.linalg.eigvalsh(hs.reshape(len(x), d, d))[:, -1].cpu().numpy()
    scale = np.abs(dense).max()
    info["xcheck_input"] = {
        "method": "dense per-sample torch.func.hessian (vmap) + eigvalsh, float64",
        "max_abs_diff_over_max": float(np.abs(dense - ref["input"]).max() / scale),
        "seconds": time.perf_counter() - t0,
    }
    log(
        f"cross-check input Hessians (dense f64): max |diff| / max eig "
        f"{info['xcheck_input']['max_abs_diff_over_max']:.2e}"
    )


def products(s: Setting, libs, ref, rec: Recorder, repeats: int) -> None:
    """One gradient (the baseline) and one HVP per library, interleaved, warmed up."""
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(s.n_params, generator=gen).to(s.device)
    hv_ref = ref["op64"].matvec(v.double())
    grad_row = rec.row("grad", "torch", "torch.autograd.grad (plain)", n_hvp=0)
    rows = {key: rec.row("hvp", key, obj.label, n_hvp=1) for key, (obj, _) in libs.items()}
    calls = [(grad_row, lambda: peers.gradient(s))]
    for key, (obj, _) in libs.items():
        calls.append((rows[key], lambda obj=obj: obj.hvp(v)))
    for _, fn in calls:  # warm-up
        fn()
    ours = libs["ours"][0]
    ours.op.release()  # time the first product too: it builds the kept gradient graph
    first = timed(lambda: ours.hvp(v), False, rec.cuda)
    one_thread_cpu = torch.get_num_threads() == 1 and not rec.cuda  # the report's clock
    rows["ours"]["first_s"] = first.cpu if one_thread_cpu else first.wall
    for _ in range(repeats):
        for r, fn in calls:
            out = rec.measure(r, fn)
            if r["task"] == "hvp" and "rel_err" not in r:
                flat = (
                    torch.cat([t.reshape(-1) for t in out])
                    if isinstance(out, (list, tuple))
                    else out
                )
                r["rel_err"] = float((flat.double() - hv_ref).norm() / hv_ref.norm())
    hvps = ", ".join(f"{k} {grad_row_median(r):.3f} s" for k, r in rows.items())
    log(f"gradient {grad_row_median(grad_row):.3f} s; HVP {hvps}")


def grad_row_median(r: dict[str, Any]) -> float:
    return float(np.median(r["times"])) if r["times"] else math.nan


def peer_cap(ours: dict[str, Any], task: str, key: str, cap: float) -> float:
    """Wall seconds a peer's run may take: STOP_AT x our latest run (at least 10 s)."""
    if key == "ours" or not ours["times"]:
        return cap
    factor = STOP_AT.get((task, key), DEFAULT_STOP_AT)
    return min(cap, max(10.0, factor * ours["times"][-1]))


def eigen(s: Setting, libs, ref, rec: Recorder, k: int, repeats: int, cap: float) -> None:
    task = f"top{k}"
    target = ref["top10"][:k]
    ours = libs["ours"][0]
    rows = {}
    settings = {
        "ours": f"lanczos(k={k}, tol={peers.OUR_TOL:g}, criterion='eigenvalue') [stops on "
        "eigenvalue error estimates; graph build timed]",
        "pyhessian": f"hessian(...).eigenvalues(top_n={k}) [defaults: maxIter=100, tol=1e-3; "
        "power iteration]",
        "eigenthings": f"lanczos(k={k}, which='LA', max_iter=<our Krylov size>, reorth) "
        "[equal budget]",
        "curvlinops": f"HessianLinearOperator.to_scipy() + eigsh(k={k}, which='LA', "
        f"tol={peers.EIGSH_TOL:g})",
    }
    for key, (obj, _) in libs.items():
        rows[key] = rec.row(task, key, obj.label, settings=settings[key])
    for rep in range(repeats):
        for key, (obj, counter) in libs.items():
            r = rows[key]
            if r.get("capped") or (rep > 0 and r["times"] and r["times"][-1] > SLOW_RUN_S):
                continue
            if key == "eigenthings":
                m = ours.krylov[k]
                r["settings"] = settings[key].replace("<our Krylov size>", str(m))
                fn = lambda obj=obj, m=m: obj.top(k, m)  # noqa: E731
            else:
                fn = lambda obj=obj: obj.top(k)  # noqa: E731
            out = rec.measure(r, fn, counter, peer_cap(rows["ours"], task, key, cap))
            if out is not None:
                vals, extra = out
                r["rel_err"] = rel_err(vals, target)
                r["eigenvalues"] = vals[:k].tolist()
                r.update(extra)
    log(
        f"{task}: "
        + ", ".join(
            f"{key} "
            + (
                f"{np.median(r['times']):.2f} s err {r.get('rel_err', math.nan):.1e}"
                if r["times"]
                else f"> {r.get('cap_s')} s"
            )
            for key, r in rows.items()
        )
    )


DEFLATE_K = 10  # the deflated trace row reuses the top-10 eigenpairs


def traces(s: Setting, libs, ref, rec: Recorder, repeats: int, probes: int, cap: float) -> None:
    settings = {
        "ours": f"hutchinson_trace(min_probes={probes}, max_probes={probes}) [Rademacher]",
        "pyhessian": f"hessian(...).trace(maxIter={probes}) [its rule: tol=1e-3 on the "
        "running mean]",
        "eigenthings": f"trace(num_matvecs={probes}) [its default method, Hutch++]",
        "curvlinops": f"hutchinson_trace(num_matvecs={probes}) [10 columns per call]",
    }
    rows = {
        key: rec.row("trace", key, obj.label, settings=settings[key])
        for key, (obj, _) in libs.items()
    }
    ours, ours_counter = libs["ours"]
    runs = {
        key: (lambda obj=obj: obj.trace(probes), counter) for key, (obj, counter) in libs.items()
    }
    if DEFLATE_K in ours.found:
        rows["deflated"] = rec.row(
            "trace",
            "deflated",
            f"{ours.label}, top-{DEFLATE_K} deflated",
            settings=f"hutchinson_trace(min_probes={probes}, max_probes={probes}, "
            f"deflate=<the top-{DEFLATE_K} above>) [same probes; the top-{DEFLATE_K}'s own "
            "time and products not included]",
        )
        runs["deflated"] = (lambda: ours.trace_deflated(probes, DEFLATE_K), ours_counter)
    for rep in range(repeats):
        for key, (run, counter) in runs.items():
            r = rows[key]
            if r.get("capped") or (rep > 0 and r["times"] and r["times"][-1] > SLOW_RUN_S):
                continue
            out = rec.measure(
                r,
                run,
                counter,
                peer_cap(rows["ours"], "trace", key, cap),
            )
            if out is not None:
                est, extra = out
                r["estimate"] = est
                r["rel_err"] = abs(est - ref["trace"]) / abs(ref["trace"])
                r.update(extra)
    log(
        "trace: "
        + ", ".join(
            f"{key} {np.median(r['times']):.2f} s err {r.get('rel_err', math.nan):.1e}"
            if r["times"]
            else f"{key} capped"
            for key, r in rows.items()
        )
    )


def input_hessians(s: Setting, ref, rec: Recorder, repeats: int, loop_cap: float) -> None:
    """Batched per-sample input Hessians against per-sample loops, by each of the engine's
    methods (Lanczos, the default, and the Jacobian route); batched runs are interleaved
    with the (long, run once) loops so load from elsewhere hits both."""
    from analysis.hessian import input_hessian_eigenvalues

    x, y = s.x[:N_INPUT], s.y[:N_INPUT]
    model, tol = s.model, peers.OUR_TOL
    target = ref["input"]
    # Confidently classified samples have tiny top eigenvalues that float32 cannot resolve
    # (p(1-p) with p near 1); they are measured against 0.1% of the largest instead.
    floor = INPUT_ERR_FLOOR * np.abs(target).max()

    def err(vals: np.ndarray, done: int) -> float:
        t = target[:done]
        return float(np.max(np.abs(vals - t) / np.maximum(np.abs(t), floor)))

    def batched_run(r: dict[str, Any]) -> None:
        vals = rec.measure(
            r,
            lambda: input_hessian_eigenvalues(
                model, peers.CE, x, y, k=1, tol=tol, method=r["method"]
            ),
        )
        r["rel_err"] = err(vals[:, 0].cpu().numpy(), N_INPUT)

    def loop(fn, r: dict[str, Any]) -> None:
        out = []
        deadline = time.perf_counter() + loop_cap

        def run() -> None:
            for i in range(N_INPUT):
                if time.perf_counter() > deadline:
                    break
                out.append(fn(i))

        rec.measure(r, run)
        done = len(out)
        r["samples_done"] = done
        if done < N_INPUT:  # extrapolate the per-sample rate to all samples
            r["times"][-1] *= N_INPUT / done
            r["cpu"][-1] *= N_INPUT / done
            r["extrapolated"] = True
        r["rel_err"] = err(np.array(out), done)

    def engine(method: str):
        def one(i: int) -> float:
            xi, yi = x[i : i + 1], y[i : i + 1]
            vals = input_hessian_eigenvalues(model, peers.CE, xi, yi, k=1, tol=tol, method=method)
            return float(vals[0, 0])

        return one

    def dense(i: int) -> float:
        xi, yi = x[i], y[i : i + 1]
        h = torch.autograd.functional.hessian(
            lambda z: torch.nn.functional.cross_entropy(model(z[None]), yi), xi, vectorize=True
        )
        d = xi.numel()
        return float(torch.linalg.eigvalsh(h.reshape(d, d))[-1])

    batched = []
    for key, method, how in (
        ("batched", "lanczos", "[default: Lanczos, 512 samples per lock-step batch]"),
        ("batched_jacobian", "jacobian", "[exact, from the output Jacobian]"),
    ):
        r = rec.row(
            "input",
            key,
            "hessweep batched" + ("" if method == "lanczos" else f", method='{method}'"),
            settings=f"input_hessian_eigenvalues(k=1, tol={tol:g}, method='{method}') on all "
            f"{N_INPUT} samples {how}",
            method=method,
        )
        batched.append(r)
    loops = []
    for key, method in (("loop_engine", "lanczos"), ("loop_jacobian", "jacobian")):
        r = rec.row(
            "input",
            key,
            "per-sample loop: this engine"
            + ("" if method == "lanczos" else f", method='{method}'"),
            settings=f"for each sample: input_hessian_eigenvalues(x[i:i+1], k=1, tol={tol:g}, "
            f"method='{method}') [the same engine, batch of one]",
            method=method,
        )
        loops.append((r, engine(method)))
    if x[0].numel() <= 256:  # a dense d x d Hessian per sample is only sensible for small d
        loops.append(
            (
                rec.row(
                    "input",
                    "loop_dense",
                    "per-sample loop: dense Hessian",
                    settings="for each sample: torch.autograd.functional.hessian("
                    "vectorize=True) + eigvalsh",
                ),
                dense,
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in batched:
            batched_run(r)
        for r, fn in loops:
            loop(fn, r)
            for b in batched:
                batched_run(b)
        for _ in range(repeats - 1 - len(loops)):
            for r in batched:
                batched_run(r)
    log(
        "input Hessians: "
        + ", ".join(
            f"{r['key']} {np.median(r['times']):.2f} s" for r in rec.rows if r["task"] == "input"
        )
    )


def main(name: str, out_path: str) -> None:
    torch.set_num_threads(threads())
    # Noise from the peers' internals (PyHessian's backward(create_graph=True), jit notes)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    device = bench_device()
    cuda = device == "cuda"
    plan = (GPU_PLAN if cuda else PLAN)[name]
    t_start = time.perf_counter()
    memory = cuda or hwm_supported()
    s = make_setting(name, device=device)
    log(f"{s.title}: {s.n_params:,} parameters; {s.note}")
    info: dict[str, Any] = {
        # ratios use CPU seconds when one thread runs (robust to other load), else wall
        "clock": "cpu" if torch.get_num_threads() == 1 and not cuda else "wall",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "memory_kind": "CUDA allocator" if cuda else "RSS",
        "setting": name,
        "title": s.title,
        "n_params": s.n_params,
        "note": s.note,
        "n_samples": len(s.x),
        "threads": torch.get_num_threads(),
        "memory": memory,
        "plan": plan,
        "torch": torch.__version__,
    }
    rec = Recorder(name, memory, cuda)
    try:
        ref = references(s, info)
        if name == "digits":
            cross_checks(s, ref, info)
        else:
            info["xcheck_top"] = {
                "method": "not run (a dense 549,994^2 Hessian needs 2.4 TB); the reference is "
                "certified by its float64 residuals instead"
            }
        libs = peers.build(s)
        products(s, libs, ref, rec, plan["hvp_repeats"])
        eigen(s, libs, ref, rec, 1, plan["repeats"], plan["cap_s"])
        eigen(s, libs, ref, rec, 10, plan["repeats"], plan["cap_s"])
        traces(s, libs, ref, rec, plan["repeats"], plan["probes"], plan["cap_s"])
        input_hessians(s, ref, rec, plan["repeats"], plan["loop_cap_s"])
    except Exception as exc:  # keep what was measured; the report names the failure
        info["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {info['error']}")
        import traceback

        traceback.print_exc()
    info["seconds"] = time.perf_counter() - t_start
    with open(out_path, "w") as f:
        json.dump({"info": info, "rows": rec.rows}, f, indent=1, default=float)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
