"""Findings on synthetic per-trial tables: monotone, anti-monotone, noisy, one batch size."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.report import NOT_ENOUGH, NOT_SUPPORTED, SUPPORTED, all_findings
from analysis.report.findings import (
    batch_trends,
    finding_batch_robustness,
    finding_batch_sharpness,
    finding_robust_flatter,
    finding_saddle_free,
    one_sided_spearman,
    rho_bound,
)

BATCHES = ["16", "64", "256", "full"]
POSITION = {"16": 16.0, "32": 32.0, "64": 64.0, "128": 128.0, "256": 256.0, "full": 1437.0}
SIX = ["16", "32", "64", "128", "256", "full"]


def table(
    lam, adv=None, inp=None, robust=("none",), seeds=(0,), batches=BATCHES, neg=0.0, ratio=-1e-9
):
    """Trials with lambda_max = lam(robust index, batch index, seed), etc."""
    rows = []
    for r_i, robust_label in enumerate(robust):
        for b_i, batch in enumerate(batches):
            for seed in seeds:
                rows.append(
                    {
                        "robust": robust_label,
                        "batch_size": batch,
                        "batch_value": POSITION[batch],
                        "seed": seed,
                        "epochs": 10.0,
                        "diverged": False,
                        "reached_target": math.nan,
                        "lambda_max": lam(r_i, b_i, seed),
                        "adv_acc": adv(r_i, b_i, seed) if adv else math.nan,
                        "input_lambda_max": inp(r_i, b_i, seed) if inp else math.nan,
                        "test_acc": 0.9,
                        "trace": math.nan,
                        "neg_fraction": neg,
                        "min_eig_ratio": ratio,
                        "input_samples": 50,
                        "run_id": f"r{r_i}{b_i}{seed}",
                    }
                )
    return pd.DataFrame(rows)


def test_monotone_sweep_supports_every_finding():
    trials = table(
        lam=lambda r, b, s: (1 + b) * (1 if r == 0 else 0.5),
        adv=lambda r, b, s: 0.9 - 0.1 * b,
        inp=lambda r, b, s: 1 + b,
        robust=("none", "fgsm-0.1"),
    )
    findings = all_findings(trials)
    assert [f.verdict for f in findings] == [SUPPORTED] * 4
    f1 = findings[0]
    assert f1.statistics["lambda_max | none"]["rho"] == pytest.approx(1.0)
    assert f1.statistics["lambda_max | none"]["p_value"] == pytest.approx(1 / 24)
    assert any("rho(batch size, lambda_max) = +1.00" in e for e in f1.evidence)


def test_anti_monotone_sweep_is_not_supported():
    trials = table(
        lam=lambda r, b, s: (10 - b) * (1 if r == 0 else 2),
        adv=lambda r, b, s: 0.5 + 0.1 * b,
        inp=lambda r, b, s: 10 - b,
        robust=("none", "fgsm-0.1"),
        neg=0.3,
        ratio=-0.2,
    )
    findings = all_findings(trials)
    assert [f.verdict for f in findings] == [NOT_SUPPORTED] * 4
    assert findings[0].statistics["lambda_max | none"]["rho"] == pytest.approx(-1.0)
    assert "contradicts" in findings[2].evidence[0]


def test_noisy_sweep_without_trend_is_not_supported():
    gen = np.random.default_rng(0)
    noise = {(b, s): float(gen.normal()) for b in range(4) for s in range(5)}
    trials = table(lam=lambda r, b, s: 5 + noise[(b, s)], seeds=range(5))
    f1 = finding_batch_sharpness(trials)
    rho = f1.statistics["lambda_max | none"]["rho"]
    assert abs(rho) < 0.5
    assert f1.verdict == NOT_SUPPORTED
    # 20 trials bound rho well below 0.5: the missing trend is evidence against the claim
    assert f1.evidence[0].endswith("-> contradicts (the 95% bound on rho, +0.20, rules out +0.5)")


def test_weak_or_opposite_trends_in_few_trials_are_not_enough_data():
    # four points cannot rule out a rho of 0.5, nor show a trend the other way unless perfect
    for values, rho in (([1.0, 3.0, 2.0, 1.5], 0.2), ([2.0, 1.0, 4.0, 0.5], -0.4)):
        trials = table(lam=lambda r, b, s, v=values: v[b])
        f1 = finding_batch_sharpness(trials)
        assert f1.statistics["lambda_max | none"]["rho"] == pytest.approx(rho)
        assert f1.verdict == NOT_ENOUGH
        assert "too few trials to tell: the 95% bound on rho" in f1.evidence[0]
    almost_reversed = table(lam=lambda r, b, s: [3.0, 4.0, 2.0, 1.0][b])  # rho -0.8, p 4/24
    assert finding_batch_sharpness(almost_reversed).verdict == NOT_ENOUGH
    reversed_ = table(lam=lambda r, b, s: [4.0, 3.0, 2.0, 1.0][b])
    f1 = finding_batch_sharpness(reversed_)
    assert f1.verdict == NOT_SUPPORTED
    assert "(a trend the other way, one-sided p = 0.0417)" in f1.evidence[0]


def test_a_significant_trend_in_the_claimed_direction_never_contradicts():
    # 6 batch sizes x 5 seeds, a noisy rise: rho under 0.5 but p < 0.05
    gen = np.random.default_rng(1)
    noise = {(b, s): float(gen.normal()) for b in range(6) for s in range(5)}
    trials = table(lam=lambda r, b, s: b + 3.5 * noise[(b, s)], seeds=range(5), batches=SIX)
    (trend,) = batch_trends(trials, "lambda_max", "lambda_max", +1)
    assert 0 < trend.rho < 0.5 and trend.p_value < 0.05
    assert trend.outcome == "inconclusive"
    assert trend.describe().endswith("(significant, but weaker than 0.5)")


def test_the_confidence_bound_narrows_with_trials_and_is_on_the_claimed_side():
    assert rho_bound(0.2, 3, +1) == 1.0 and rho_bound(0.2, 3, -1) == -1.0
    wide, narrow = rho_bound(0.2, 8, +1), rho_bound(0.2, 80, +1)
    assert narrow < wide < 1.0 and narrow > 0.2
    # a claimed fall: the bound is the lower one, mirrored
    assert rho_bound(-0.2, 80, -1) == pytest.approx(-narrow)


def test_a_quantity_without_variation_is_inconclusive_not_a_contradiction():
    # a strong attack leaves every model at 0% adversarial accuracy: nothing to rank
    trials = table(
        lam=lambda r, b, s: 1.0 + b, adv=lambda r, b, s: 0.0, inp=lambda r, b, s: 1.0 + b
    )
    f2 = finding_batch_robustness(trials)
    assert f2.verdict == NOT_ENOUGH
    assert any("adversarial accuracy is 0 in all 4 trials" in e for e in f2.evidence)
    assert "adversarial accuracy part: Not enough data" in f2.evidence[-1]


def test_the_p_value_floor_counts_tied_batch_sizes():
    # batch 64 twice: the best ordering has two tied pairings, so p cannot go below 2/24
    rows = table(lam=lambda r, b, s: 1.0, batches=["16", "64", "64", "256"])
    rows["lambda_max"] = [1.0, 2.0, 3.0, 4.0]
    (trend,) = batch_trends(rows, "lambda_max", "lambda_max", +1)
    assert trend.outcome == "inconclusive"
    assert trend.p_value == pytest.approx(2 / 24) and trend.p_floor == pytest.approx(2 / 24)
    assert "4 trials cannot give p below 0.0833" in trend.describe()


def test_weak_monotone_evidence_is_not_enough_data():
    # four points with one swap: right direction, rho 0.8, but p = 4/24 > 0.05
    values = [1.0, 2.0, 4.0, 3.0]
    trials = table(lam=lambda r, b, s: values[b])
    f1 = finding_batch_sharpness(trials)
    assert f1.statistics["lambda_max | none"]["rho"] == pytest.approx(0.8)
    assert f1.statistics["lambda_max | none"]["p_value"] == pytest.approx(4 / 24)
    assert f1.verdict == NOT_ENOUGH


def test_single_batch_size_is_not_enough_data():
    trials = table(
        lam=lambda r, b, s: 10.0 - 5 * r + s,
        adv=lambda r, b, s: 0.5,
        inp=lambda r, b, s: 1.0,
        robust=("none", "fgsm-0.1"),
        seeds=(0, 1, 2),
        batches=["64"],
    )
    f1, f2, f3, _ = all_findings(trials)
    assert f1.verdict == NOT_ENOUGH and f2.verdict == NOT_ENOUGH
    assert "1 batch size(s)" in f1.evidence[0]
    # one shared batch size cannot show "at every batch size", even with separated seeds
    assert f3.verdict == NOT_ENOUGH
    assert any("flatter at 1 of 1" in e for e in f3.evidence)


def test_robust_flatter_needs_separated_seeds_and_two_batch_sizes():
    separated = table(lam=lambda r, b, s: 10 - 5 * r + 0.1 * s, robust=("none", "pgd-0.1"))
    assert finding_robust_flatter(separated).verdict == SUPPORTED
    overlapping = table(
        lam=lambda r, b, s: 10 - 0.5 * r + 2 * s, robust=("none", "pgd-0.1"), seeds=(0, 1)
    )
    f3 = finding_robust_flatter(overlapping)
    assert f3.verdict == NOT_ENOUGH
    assert "overlap" in f3.evidence[0]
    one_batch = table(lam=lambda r, b, s: 10 - 5 * r, robust=("none", "pgd-0.1"), batches=["64"])
    assert finding_robust_flatter(one_batch).verdict == NOT_ENOUGH
    plain_only = table(lam=lambda r, b, s: 1.0)
    assert finding_robust_flatter(plain_only).verdict == NOT_ENOUGH


def test_robustness_finding_needs_both_parts():
    only_adv = table(lam=lambda r, b, s: 1.0, adv=lambda r, b, s: 0.9 - 0.1 * b)
    f2 = finding_batch_robustness(only_adv)
    assert f2.verdict == NOT_ENOUGH
    assert "input-Hessian part: Not enough data" in f2.evidence[-1]


def test_trials_whose_solver_did_not_converge_are_left_out_and_named():
    trials = table(
        lam=lambda r, b, s: [1.0, 2.0, 3.0, 4.0, 5.0][b] * (1 if r == 0 else 0.5),
        inp=lambda r, b, s: 1.0 + b,
        robust=("none", "fgsm-0.1"),
        batches=["16", "64", "256", "full"],
    ).assign(converged=1.0, input_converged=1.0)
    trials.loc[(trials["batch_size"] == "full") & (trials["robust"] == "none"), "converged"] = 0.0
    trials.loc[trials["batch_size"] == "16", "input_converged"] = 0.99
    f1, f2, f3, _ = all_findings(trials)
    assert f1.statistics["lambda_max | none"]["n"] == 3
    assert f1.statistics["lambda_max | fgsm-0.1"]["n"] == 4
    assert set(f3.statistics) == {"fgsm-0.1 | 16", "fgsm-0.1 | 64", "fgsm-0.1 | 256"}
    assert f2.statistics["input-Hessian lambda_max | none"]["n"] == 3
    named = [e for e in f1.evidence if e.startswith("left out of the lambda_max tests")]
    assert named == [
        "left out of the lambda_max tests (findings 1 and 3), their weight-Hessian Lanczos "
        "did not converge (hessian/converged 0): bs=full none seed=0"
    ]
    assert any(e.startswith("left out of the input-Hessian trend") for e in f2.evidence)
    # runs that did not log convergence (NaN) count as converged
    legacy = trials.assign(converged=math.nan, input_converged=math.nan)
    assert finding_batch_sharpness(legacy).statistics["lambda_max | none"]["n"] == 4


def test_saddle_free_counts_unconverged_samples_against_it():
    base = table(lam=lambda r, b, s: 1.0)  # 4 trials x 50 samples, none negative
    assert finding_saddle_free(base.assign(input_unconverged=0)).verdict == SUPPORTED
    assert finding_saddle_free(base.assign(input_unconverged=[0, 1, 0, 0])).verdict == SUPPORTED
    f4 = finding_saddle_free(base.assign(input_unconverged=[3, 0, 0, 0]))  # up to 1.5%
    assert f4.verdict == NOT_ENOUGH and f4.statistics["unconverged"] == 3
    assert any("as negative, at most 1.50% are" in e for e in f4.evidence)
    # samples without finite eigenvalues count against it too
    blank = finding_saddle_free(base.assign(input_unconverged=0, input_nonfinite=[0, 0, 3, 0]))
    assert blank.verdict == NOT_ENOUGH and blank.statistics["no_finite_values"] == 3
    assert any("3 gave no finite eigenvalues" in e for e in blank.evidence)
    clearly = base.assign(input_unconverged=[3, 0, 0, 0], neg_fraction=0.05)
    assert finding_saddle_free(clearly).verdict == NOT_SUPPORTED  # negatives are certain
    no_scale = base.assign(min_eig_ratio=math.nan)
    assert finding_saddle_free(no_scale).verdict == NOT_ENOUGH


def test_saddle_free_needs_samples_and_a_small_negative_fraction():
    few = table(lam=lambda r, b, s: 1.0, batches=["16"]).assign(input_samples=5)
    assert finding_saddle_free(few).verdict == NOT_ENOUGH
    clean = table(lam=lambda r, b, s: 1.0)
    f4 = finding_saddle_free(clean)
    assert f4.verdict == SUPPORTED
    assert f4.statistics["samples"] == 200 and f4.statistics["neg_fraction"] == 0.0
    deep_negative = table(lam=lambda r, b, s: 1.0, ratio=-0.05)
    assert finding_saddle_free(deep_negative).verdict == NOT_SUPPORTED


def test_diverged_trials_do_not_count():
    trials = table(lam=lambda r, b, s: [1.0, 2.0, 3.0, 0.1][b])
    trials.loc[trials["batch_size"] == "full", "diverged"] = True
    f1 = finding_batch_sharpness(trials)
    assert f1.statistics["lambda_max | none"]["n"] == 3
    assert f1.statistics["lambda_max | none"]["rho"] == pytest.approx(1.0)


def test_trials_short_of_the_target_loss_are_left_out_and_named():
    trials = table(lam=lambda r, b, s: [1.0, 2.0, 3.0, 4.0][b]).assign(reached_target=1.0)
    assert all_findings(trials)[0].verdict == SUPPORTED
    trials.loc[trials["batch_size"] == "full", "reached_target"] = 0.0
    f1 = all_findings(trials)[0]
    assert f1.verdict == NOT_ENOUGH  # three points left: p >= 1/6
    assert f1.statistics["lambda_max | none"]["n"] == 3
    assert f1.evidence[-1] == "left out, did not reach target_train_loss: bs=full none seed=0"


def test_a_sweep_without_a_target_loss_carries_a_caveat_with_its_loss_range():
    trials = table(lam=lambda r, b, s: [1.0, 2.0, 3.0, 4.0][b])
    trials["train_loss"] = [0.05, 0.3, 0.9, 2.1]
    f1, f2, f3, f4 = all_findings(trials)
    caveat = [e for e in f1.evidence if e.startswith("caveat: no target_train_loss")]
    assert len(caveat) == 1 and caveat[0].endswith("(final training loss 0.05 to 2.1)")
    assert caveat[0] in f2.evidence and caveat[0] in f3.evidence
    assert not any(e.startswith("caveat") for e in f4.evidence)  # not a batch comparison
    with_target = all_findings(trials.assign(reached_target=1.0))[0]
    assert not any(e.startswith("caveat") for e in with_target.evidence)
    # at a target, how far below it the compared trials ended is still shown
    assert with_target.evidence[-1].startswith(
        "the compared trials ended at training loss 0.05 to 2.1: target_train_loss is checked"
    )


def test_several_trials_in_one_cell_carry_a_caveat():
    # a search without select keeps every sampled trial: they are not independent seeds
    trials = table(lam=lambda r, b, s: 1.0 + b)
    assert not any("hold several trials" in e for e in all_findings(trials)[0].evidence)
    searched = pd.concat([trials, trials.assign(lambda_max=trials["lambda_max"] + 0.5)])
    f1 = all_findings(searched)[0]
    assert any(e.startswith("caveat: 4 (robust, batch size, seed) cell(s)") for e in f1.evidence)


def test_p_value_is_exact_and_one_sided():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    rho, p = one_sided_spearman(x, x, +1)
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 120)
    rho, p = one_sided_spearman(x, x, -1)
    assert p == pytest.approx(1.0)
    rho, p = one_sided_spearman(x, np.ones(5), +1)
    assert math.isnan(rho) and math.isnan(p)
