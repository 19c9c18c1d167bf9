"""The paper's four findings (DESIGN.md), each checked against one sweep with its statistic.

Verdicts are Supported, Not supported or Not enough data, decided by fixed rules (see
``RULES``) so they never say more than the sweep shows. Trends in batch size use
Spearman's rho (``scipy.stats.spearmanr``) with a one-sided permutation p-value in the
direction the paper claims (exact for small sweeps; the asymptotic p-value of
``spearmanr`` is far too small for four points).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from analysis.report.table import robust_order

SUPPORTED, NOT_SUPPORTED, NOT_ENOUGH = "Supported", "Not supported", "Not enough data"
ALPHA = 0.05
MIN_RHO = 0.5
MIN_BATCH_SIZES = 3
MIN_INPUT_SAMPLES = 20
MAX_NEG_FRACTION = 0.01
MAX_NEG_RATIO = 1e-3
PERMUTATIONS = 20000

CLAIMS = {
    1: "Large-batch training converges to points with a larger Hessian spectrum "
    "(lambda_max of the weight Hessian grows with batch size).",
    2: "Large-batch models are less robust: adversarial accuracy falls and the input-Hessian "
    "lambda_max grows with batch size.",
    3: "Robust (adversarial) training favours flatter minima: a smaller lambda_max than plain "
    "training at every batch size.",
    4: "The inner maximisation of robust training is saddle-free almost everywhere: "
    "input-Hessian eigenvalues are (numerically) non-negative.",
}
RULES = (
    f"A batch-size trend (findings 1 and 2) is tested per robust setting with Spearman's rho "
    f"over trials (each seed a point) and one-sided permutation p-values (exact up to 7 "
    f"trials, else {PERMUTATIONS} random pairings). It agrees when rho has the claimed sign "
    f"with |rho| >= {MIN_RHO} and p < {ALPHA} in the claimed direction. It contradicts when "
    f"the trend the other way is significant (p < {ALPHA}), or when, not significant in the "
    f"claimed direction, the one-sided {1 - ALPHA:.0%} confidence bound on rho (Fisher z, "
    f"Bonett-Wright variance) rules out a rho of {MIN_RHO} in it. Anything else is "
    f"inconclusive: too few trials to tell, a significant trend weaker than {MIN_RHO}, or a "
    f"quantity with one value in every trial (nothing to rank). It needs {MIN_BATCH_SIZES} "
    "or more batch sizes with finite values; trials whose solver did not converge are left "
    "out of the trends they would enter, and named.",
    "A finding is Supported when every testable part agrees, Not supported when any part "
    "contradicts, and Not enough data otherwise (nothing testable, or only inconclusive parts).",
    "Finding 3 compares lambda_max per batch size: the robust setting is flatter there when "
    "its largest seed value is below the smallest plain one, and contradicts when its mean is "
    "not below the plain mean. Supported needs flatter at every shared batch size, and at "
    "least two of them.",
    f"Finding 4 pools the input-Hessian samples of all trials: Supported when at most "
    f"{MAX_NEG_FRACTION:.0%} of samples have a clearly negative smallest eigenvalue (the "
    f"sweep's own neg_fraction rule), still so when every sample whose solve did not converge "
    f"or gave no finite eigenvalues is counted as negative too, and the most negative "
    f"eigenvalue is within {MAX_NEG_RATIO:g} of the largest in magnitude; Not supported when "
    f"either bound is broken; Not enough data below {MIN_INPUT_SAMPLES} samples, when the "
    "unconverged samples could break the first bound, or when no sample has a nonzero "
    "largest eigenvalue to scale by.",
)


@dataclass(frozen=True)
class Trend:
    """One Spearman test of a quantity against batch size within one robust setting.

    ``sign`` is the claimed direction; ``p_value`` and ``p_opposite`` are the one-sided
    permutation p-values in it and against it, ``p_floor`` the smallest p-value these
    trials can give (ties included), and ``bound`` the one-sided confidence bound on rho on
    the claimed side (an upper bound for a claimed rise, a lower one for a fall)."""

    robust: str
    quantity: str
    n_points: int
    n_batch_sizes: int
    rho: float
    p_value: float
    outcome: str
    sign: int = 1
    p_opposite: float = math.nan
    p_floor: float = math.nan
    bound: float = math.nan
    constant: float = math.nan

    def describe(self) -> str:
        """One line of evidence."""
        if self.outcome == "too few":
            return (
                f"{self.robust}: {self.quantity} has {self.n_batch_sizes} batch size(s) with "
                f"finite values; a trend needs {MIN_BATCH_SIZES}"
            )
        if self.outcome == "no variation":
            line = (
                f"{self.robust}: {self.quantity} is {self.constant:.4g} in all {self.n_points} "
                f"trials at {self.n_batch_sizes} batch sizes: nothing to rank -> inconclusive"
            )
            if "adversarial" in self.quantity:
                line += " (an attack too strong or too weak to tell the models apart)"
            return line
        line = (
            f"{self.robust}: Spearman rho(batch size, {self.quantity}) = {self.rho:+.2f}, "
            f"one-sided p = {self.p_value:.3g} over {self.n_points} trials at "
            f"{self.n_batch_sizes} batch sizes -> {self.outcome}"
        )
        why = self._why()
        return f"{line} ({why})" if why else line

    def _why(self) -> str:
        """Why a trend that does not agree came out as it did."""
        target = f"{self.sign * MIN_RHO:+.1f}"
        if self.outcome == "contradicts":
            if self.p_opposite < ALPHA:
                return f"a trend the other way, one-sided p = {self.p_opposite:.3g}"
            return f"the {1 - ALPHA:.0%} bound on rho, {self.bound:+.2f}, rules out {target}"
        if self.outcome != "inconclusive":
            return ""
        if _strong(self.sign * self.rho):
            if self.p_floor >= ALPHA:
                return (
                    f"{self.n_points} trials cannot give p below {self.p_floor:.3g}: add seeds "
                    "or sizes"
                )
            return "not significant: add seeds or sizes"
        if self.p_value < ALPHA:
            return f"significant, but weaker than {MIN_RHO}"
        return (
            f"too few trials to tell: the {1 - ALPHA:.0%} bound on rho, {self.bound:+.2f}, "
            f"does not rule out {target}; add seeds or sizes"
        )


@dataclass(frozen=True)
class Finding:
    """One of the paper's claims, this sweep's verdict, and the evidence behind it."""

    number: int
    claim: str
    verdict: str
    evidence: tuple[str, ...]
    statistics: dict[str, Any] = field(default_factory=dict)


def one_sided_spearman(
    x: np.ndarray, y: np.ndarray, sign: int, seed: int = 0
) -> tuple[float, float]:
    """Spearman's rho and the permutation p-value of a trend at least as strong in ``sign``'s
    direction (exact up to 7 points, else ``PERMUTATIONS`` seeded random pairings)."""
    rho, p, _ = _spearman_test(x, y, sign, seed)
    return rho, p


def _spearman_test(
    x: np.ndarray, y: np.ndarray, sign: int, seed: int = 0
) -> tuple[float, float, np.ndarray]:
    """``one_sided_spearman`` with the permutation null distribution of rho (empty when rho
    is undefined)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, np.empty(0)
    rho = float(stats.spearmanr(x, y).statistic)
    rx, ry = stats.rankdata(x), stats.rankdata(y)

    def statistic(ranks_y: np.ndarray, axis: int = -1) -> np.ndarray:
        a = rx - rx.mean()
        b = ranks_y - ranks_y.mean(axis=axis, keepdims=True)
        return (a * b).sum(axis=axis) / np.sqrt((a**2).sum() * (b**2).sum(axis=axis))

    res = stats.permutation_test(
        (ry,),
        statistic,
        permutation_type="pairings",
        vectorized=True,
        n_resamples=PERMUTATIONS,
        alternative="greater" if sign > 0 else "less",
        rng=np.random.default_rng(seed),
    )
    return rho, float(res.pvalue), np.asarray(res.null_distribution, dtype=float)


def _tail(null: np.ndarray, value: float, sign: int, n_points: int) -> float:
    """The one-sided permutation p-value a rho of ``value`` would get in ``sign``'s direction
    (SciPy's convention: a share of all pairings, or (hits + 1) / (resamples + 1))."""
    eps = 1e-14 * max(abs(value), 1.0)
    hits = int((null >= value - eps).sum() if sign > 0 else (null <= value + eps).sum())
    if math.factorial(n_points) <= PERMUTATIONS:
        return hits / len(null)
    return (hits + 1) / (len(null) + 1)


def _strong(signed_rho: float) -> bool:
    """Whether a rho in the claimed direction reaches ``MIN_RHO`` (rounding forgiven)."""
    return signed_rho >= MIN_RHO - 1e-12


def rho_bound(rho: float, n: int, sign: int) -> float:
    """The one-sided ``1 - ALPHA`` confidence bound on Spearman's rho on the claimed side
    (upper for ``sign`` +1, lower for -1): Fisher's z with Bonett and Wright's variance
    (1 + rho^2 / 2) / (n - 3); no bound (+-1) for 3 points or fewer."""
    if n <= 3:
        return float(sign)
    r = min(max(sign * rho, -1 + 1e-12), 1 - 1e-12)
    z = math.atanh(r) + stats.norm.ppf(1 - ALPHA) * math.sqrt((1 + r * r / 2) / (n - 3))
    return sign * math.tanh(z)


def comparable(trials: pd.DataFrame) -> pd.DataFrame:
    """Trials whose minima can be compared: not diverged, and at the sweep's target training
    loss when it set one (the paper compares batch sizes at equal training loss)."""
    missed = trials["reached_target"].astype(float) == 0.0
    return trials[~trials["diverged"].astype(bool) & ~missed]


SOLVED = {
    "converged": " of the lambda_max tests (findings 1 and 3), their weight-Hessian Lanczos "
    "did not converge (hessian/converged 0)",
    "input_converged": " of the input-Hessian trend (finding 2), not every sample's solve "
    "converged (input_hessian/converged_fraction below 1)",
}


def converged(trials: pd.DataFrame, column: str) -> pd.Series:
    """Which trials' solver converged by ``column`` (``converged``: 1/0; ``input_converged``:
    the converged fraction); runs that did not log it count as converged."""
    if column not in trials:
        return pd.Series(True, index=trials.index)
    values = trials[column].astype(float)
    return values.isna() | (values >= 1.0)


def excluded(trials: pd.DataFrame) -> list[str]:
    """Evidence lines naming the trials ``comparable`` and ``converged`` leave out, and why."""
    out = []
    diverged = trials[trials["diverged"].astype(bool)]
    missed = trials[~trials["diverged"].astype(bool) & (trials["reached_target"] == 0.0)]
    usable = comparable(trials)
    unsolved = [(why, usable[~converged(usable, column)]) for column, why in SOLVED.items()]
    for label, rows in (
        (", diverged", diverged),
        (", did not reach target_train_loss", missed),
        *unsolved,
    ):
        if len(rows):
            names = ", ".join(
                f"bs={r.batch_size} {r.robust} seed={r.seed}" for r in rows.itertuples()
            )
            out.append(f"left out{label}: {names}")
    out.extend(_loss_lines(trials, usable))
    cells = usable.groupby(["robust", "batch_size", "seed"], sort=False).size()
    if (cells > 1).any():
        out.append(
            f"caveat: {int((cells > 1).sum())} (robust, batch size, seed) cell(s) hold several "
            "trials (a search without select): each enters the tests as its own point, which "
            "overstates the evidence; set select to keep one trial per cell"
        )
    return out


def _loss_lines(trials: pd.DataFrame, usable: pd.DataFrame) -> list[str]:
    """At which training loss the batch sizes are compared: without a target, a caveat with
    the trials' range; with one, how far below it the compared trials ended."""
    if not len(trials):
        return []
    if trials["reached_target"].astype(float).isna().all():
        line = (
            "caveat: no target_train_loss was set, so batch sizes are compared at whatever "
            "training loss their trials ended at (max_epochs, or a scheduler's stop), not at "
            "a common one"
        )
        losses = _finite(trials.get("train_loss", pd.Series(dtype=float)))
        if len(losses):
            line += f" (final training loss {losses.min():.3g} to {losses.max():.3g})"
        return [line]
    losses = _finite(usable.get("train_loss", pd.Series(dtype=float)))
    if not len(losses):
        return []
    return [
        f"the compared trials ended at training loss {losses.min():.3g} to "
        f"{losses.max():.3g}: target_train_loss is checked after each epoch, so trials with "
        "many steps an epoch can end well below it"
    ]


def _finite(values: pd.Series) -> pd.Series:
    """The finite values of a column, as floats."""
    values = values.astype(float)
    return values[np.isfinite(values)]


def batch_trends(
    trials: pd.DataFrame, column: str, quantity: str, sign: int, solved: str | None = None
) -> list[Trend]:
    """The trend of ``column`` in batch size for each robust setting (comparable trials; with
    ``solved``, only those whose solver converged by that column, ``converged``)."""
    out = []
    usable = comparable(trials)
    if solved is not None:
        usable = usable[converged(usable, solved)]
    for robust in robust_order(list(trials["robust"])):
        cell = usable[usable["robust"] == robust]
        cell = cell[np.isfinite(cell[column].astype(float))]
        n_batches = cell["batch_size"].nunique()
        n = len(cell)
        if n_batches < MIN_BATCH_SIZES:
            out.append(Trend(robust, quantity, n, n_batches, math.nan, math.nan, "too few"))
            continue
        x, y = cell["batch_value"].to_numpy(float), cell[column].to_numpy(float)
        if np.ptp(y) == 0:
            nan = math.nan
            out.append(
                Trend(robust, quantity, n, n_batches, nan, nan, "no variation", sign, constant=y[0])
            )
            continue
        rho, p, null = _spearman_test(x, y, sign)
        edge = float(null.max() if sign > 0 else null.min())
        floor = _tail(null, edge, sign, n)
        p_opposite = _tail(null, rho, -sign, n)
        bound = rho_bound(rho, n, sign)
        if _strong(sign * rho) and p < ALPHA:
            outcome = "agrees"
        elif p_opposite < ALPHA or (p >= ALPHA and sign * bound < MIN_RHO):
            outcome = "contradicts"
        else:
            outcome = "inconclusive"
        out.append(
            Trend(robust, quantity, n, n_batches, rho, p, outcome, sign, p_opposite, floor, bound)
        )
    return out


def combine(outcomes: list[str]) -> str:
    """The verdict from the parts' outcomes ('agrees', 'contradicts', 'inconclusive', ...)."""
    tested = [o for o in outcomes if o in ("agrees", "contradicts", "inconclusive", "no variation")]
    if any(o == "contradicts" for o in tested):
        return NOT_SUPPORTED
    if tested and all(o == "agrees" for o in tested):
        return SUPPORTED
    return NOT_ENOUGH


def _trend_stats(trends: list[Trend]) -> dict[str, Any]:
    return {
        f"{t.quantity} | {t.robust}": {"rho": t.rho, "p_value": t.p_value, "n": t.n_points}
        for t in trends
    }


def finding_batch_sharpness(trials: pd.DataFrame) -> Finding:
    """Finding 1: lambda_max rises with batch size in every robust setting."""
    trends = batch_trends(trials, "lambda_max", "lambda_max", +1, solved="converged")
    verdict = combine([t.outcome for t in trends])
    return Finding(1, CLAIMS[1], verdict, tuple(t.describe() for t in trends), _trend_stats(trends))


def finding_batch_robustness(trials: pd.DataFrame) -> Finding:
    """Finding 2: adversarial accuracy falls and input-Hessian lambda_max rises with batch."""
    adv = batch_trends(trials, "adv_acc", "adversarial accuracy", -1)
    inp = batch_trends(
        trials, "input_lambda_max", "input-Hessian lambda_max", +1, solved="input_converged"
    )
    parts = [combine([t.outcome for t in adv]), combine([t.outcome for t in inp])]
    if NOT_SUPPORTED in parts:
        verdict = NOT_SUPPORTED
    elif all(p == SUPPORTED for p in parts):
        verdict = SUPPORTED
    else:
        verdict = NOT_ENOUGH
    evidence = (
        *(t.describe() for t in adv),
        *(t.describe() for t in inp),
        f"adversarial accuracy part: {parts[0]}; input-Hessian part: {parts[1]}",
    )
    return Finding(2, CLAIMS[2], verdict, evidence, _trend_stats(adv + inp))


def finding_robust_flatter(trials: pd.DataFrame) -> Finding:
    """Finding 3: each robust setting's lambda_max is below plain training's per batch size."""
    usable = comparable(trials)
    usable = usable[converged(usable, "converged")]
    ok = usable[np.isfinite(usable["lambda_max"].astype(float))]
    labels = robust_order(list(ok["robust"]))
    if "none" not in labels or len(labels) < 2:
        return Finding(
            3,
            CLAIMS[3],
            NOT_ENOUGH,
            (
                "needs plain training (robust none) and at least one robust setting, each with "
                "a finite lambda_max",
            ),
        )
    plain = ok[ok["robust"] == "none"]
    evidence, outcomes, table = [], [], {}
    for robust in labels[1:]:
        other = ok[ok["robust"] == robust]
        for batch in [b for b in other["batch_size"].unique() if b in set(plain["batch_size"])]:
            r = other.loc[other["batch_size"] == batch, "lambda_max"].to_numpy(float)
            p = plain.loc[plain["batch_size"] == batch, "lambda_max"].to_numpy(float)
            diff = r.mean() - p.mean()
            if r.max() < p.min():
                outcome = "flatter"
            elif diff >= 0:
                outcome = "contradicts"
            else:
                outcome = "inconclusive (seed ranges overlap)"
            outcomes.append(outcome)
            table[f"{robust} | {batch}"] = {"diff": diff, "ratio": r.mean() / p.mean()}
            evidence.append(
                f"batch {batch}: {robust} lambda_max {r.mean():.4g} vs plain {p.mean():.4g} "
                f"(difference {diff:+.4g}, ratio {r.mean() / p.mean():.3g}; "
                f"{len(r)} vs {len(p)} seed(s)) -> {outcome}"
            )
    flatter = outcomes.count("flatter")
    if not outcomes:
        verdict = NOT_ENOUGH
        evidence.append("no batch size was trained both plainly and robustly")
    elif "contradicts" in outcomes:
        verdict = NOT_SUPPORTED
    elif flatter == len(outcomes) and flatter >= 2:
        verdict = SUPPORTED
    else:
        verdict = NOT_ENOUGH
    if outcomes:
        evidence.append(
            f"flatter at {flatter} of {len(outcomes)} (robust setting, batch size) pairs"
        )
    return Finding(3, CLAIMS[3], verdict, tuple(evidence), table)


def finding_saddle_free(trials: pd.DataFrame) -> Finding:
    """Finding 4: few samples with a clearly negative input-Hessian eigenvalue, none large."""
    have = trials[trials["input_samples"] > 0]
    have = have[np.isfinite(have["neg_fraction"].astype(float))]
    n = int(have["input_samples"].sum())
    if n < MIN_INPUT_SAMPLES:
        return Finding(
            4,
            CLAIMS[4],
            NOT_ENOUGH,
            (
                f"{n} input-Hessian sample(s) logged (spectrum/input_hessian.parquet with "
                f"input_hessian/neg_fraction); needs {MIN_INPUT_SAMPLES}",
            ),
        )
    weights = have["input_samples"].to_numpy(float)
    neg = float(np.average(have["neg_fraction"].to_numpy(float), weights=weights))
    unsolved = int(have["input_unconverged"].sum()) if "input_unconverged" in have else 0
    blank = int(have["input_nonfinite"].sum()) if "input_nonfinite" in have else 0
    ratios = have["min_eig_ratio"].to_numpy(float)
    worst = float(np.nanmin(ratios)) if np.isfinite(ratios).any() else math.nan
    worst_row = have.iloc[int(np.nanargmin(ratios))] if np.isfinite(ratios).any() else None
    evidence = [
        f"{n} test samples over {len(have)} trial(s): {neg:.2%} have a clearly negative "
        "smallest input-Hessian eigenvalue (input_hessian/neg_fraction, weighted by samples)",
    ]
    worst_case = min(1.0, (neg * n + unsolved + blank) / (n + blank))
    if unsolved or blank:
        evidence.append(
            f"{unsolved} sample(s)' solves did not converge (a smallest eigenvalue that has not "
            f"converged is only an upper bound) and {blank} gave no finite eigenvalues (left "
            f"out above): counting them all as negative, at most {worst_case:.2%} are"
        )
    if worst_row is not None:
        evidence.append(
            f"most negative eigenvalue relative to the largest: {worst:.3g} "
            f"(bs={worst_row['batch_size']} {worst_row['robust']} seed={worst_row['seed']})"
        )
    else:
        evidence.append("no sample has a nonzero largest eigenvalue to scale the smallest by")
    if neg > MAX_NEG_FRACTION or worst < -MAX_NEG_RATIO:
        verdict = NOT_SUPPORTED
    elif worst_row is None or worst_case > MAX_NEG_FRACTION:
        verdict = NOT_ENOUGH
    else:
        verdict = SUPPORTED
    stats_ = {
        "samples": n,
        "neg_fraction": neg,
        "min_eig_ratio": worst,
        "unconverged": unsolved,
        "no_finite_values": blank,
    }
    return Finding(4, CLAIMS[4], verdict, tuple(evidence), stats_)


def all_findings(trials: pd.DataFrame) -> list[Finding]:
    """The four findings for one sweep's per-trial table (``table.trial_frame``)."""
    notes = tuple(excluded(trials))
    compared = [
        finding_batch_sharpness(trials),
        finding_batch_robustness(trials),
        finding_robust_flatter(trials),
    ]
    compared = [dataclasses.replace(f, evidence=f.evidence + notes) for f in compared]
    return [*compared, finding_saddle_free(trials)]
