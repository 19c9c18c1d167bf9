"""The results table: the lr trained at, and 'reached target' only where there is one."""

from __future__ import annotations

from orchestrator.results import build_table, to_markdown, trial_row

CONFIG = {"batch_size": 64, "robust": {"method": "none"}, "seed": 0, "lr": 0.1}
LAST = {"epoch": 5, "train/loss": 0.2, "test/acc": 0.9, "converged": 0, "diverged": 0}


def test_reached_target_is_blank_without_a_target_and_yes_or_no_with_one():
    rows = [
        trial_row("a", "r1", CONFIG, LAST, {}),
        trial_row("b", "r2", {**CONFIG, "target_train_loss": 0.1}, LAST, {}),
        trial_row("c", "r3", {**CONFIG, "target_train_loss": 0.3}, {**LAST, "converged": 1}, {}),
    ]
    assert [r["reached_target"] for r in rows] == [None, False, True]
    header, _, *lines = to_markdown(build_table(rows)).splitlines()
    col = [c.strip() for c in header.strip("|").split("|")].index("reached_target")
    cells = [[c.strip() for c in line.strip("|").split("|")][col] for line in lines]
    assert sorted(cells) == ["-", "no", "yes"]


def test_lr_column_is_the_lr_trained_at_not_the_base_lr():
    scaled = trial_row("a", "r1", {**CONFIG, "lr_scaling": "sqrt"}, {**LAST, "peak_lr": 0.4}, {})
    assert scaled["lr"] == 0.4
    assert trial_row("b", "r2", CONFIG, LAST, {})["lr"] == 0.1  # a result without peak_lr
