"""The summary table (mean ± std over seeds, 'full' on the batch axis) and the two renderings."""

from __future__ import annotations

import base64
import math

import pandas as pd
import pytest

from analysis.report.render import Bullets, Heading, Image, Paragraph, Table, to_html, to_markdown
from analysis.report.table import batch_position, mean_std, summary, summary_rows


def test_full_batch_sits_at_the_training_set_size_or_after_the_largest():
    assert batch_position("64", [16.0, 64.0], 1437) == 64.0
    assert batch_position("full", [16.0, 64.0], 1437) == 1437.0
    assert batch_position("full", [16.0, 64.0], None) == 256.0
    assert batch_position("full", [], None) == 1.0


def _trials() -> pd.DataFrame:
    rows = []
    for robust in ("pgd-0.1", "none"):
        for batch, pos in (("full", 500.0), ("16", 16.0)):
            for seed, lam in ((0, 1.0), (1, 3.0)):
                rows.append(
                    {
                        "robust": robust,
                        "batch_size": batch,
                        "batch_value": pos,
                        "seed": seed,
                        "test_acc": 0.9,
                        "adv_acc": math.nan,
                        "lambda_max": lam * (2 if batch == "full" else 1),
                        "trace": 5.0,
                        "input_lambda_max": 0.1,
                        "epochs": 10.0 + seed,
                        "reached_target": 0.0 if (batch, seed) == ("full", 1) else 1.0,
                    }
                )
    return pd.DataFrame(rows)


def test_summary_is_mean_and_std_over_seeds_plain_first_full_last():
    table = summary(_trials())
    assert list(zip(table["robust"], table["batch_size"], strict=True)) == [
        ("none", "16"),
        ("none", "full"),
        ("pgd-0.1", "16"),
        ("pgd-0.1", "full"),
    ]
    assert list(table["seeds"]) == [2, 2, 2, 2]
    assert list(table["missed_target"]) == [0, 1, 0, 1]
    assert table["lambda_max_mean"].tolist() == [2.0, 4.0, 2.0, 4.0]
    assert table["lambda_max_std"].iloc[0] == pytest.approx(math.sqrt(2))
    assert table["adv_acc_mean"].isna().all()
    header, rows = summary_rows(table)
    assert header[:3] == ["robust", "batch size", "seeds"]
    assert rows[0][header.index("lambda_max (weight Hessian)")] == "2 ± 1.4"
    assert rows[0][header.index("adversarial accuracy")] == "-"


def test_mean_without_spread_shows_no_plus_minus():
    assert mean_std(0.5, math.nan) == "0.5"
    assert mean_std(0.5, 0.01) == "0.5 ± 0.01"


def test_markdown_and_html_render_the_same_blocks(tmp_path):
    png = tmp_path / "figures" / "a.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    blocks = [
        Heading(1, "Report <x>"),
        Paragraph("run `abc` is **Supported** & **bold**"),
        Bullets(("one", "two | three")),
        Table(("a", "b|c"), (("1", "x|y"),)),
        Image(png, "A figure", "caption with `code`"),
    ]
    md = to_markdown(blocks, tmp_path)
    assert md.startswith("# Report <x>\n")
    assert "| a | b\\|c |" in md and "| 1 | x\\|y |" in md
    assert "![A figure](figures/a.png)" in md
    page = to_html(blocks, "t")
    assert "<h1>Report &lt;x&gt;</h1>" in page
    assert "<code>abc</code>" in page and "&amp;" in page
    assert '<span class="verdict-Supported">Supported</span>' in page
    assert "<strong>bold</strong>" in page
    encoded = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(encoded) == png.read_bytes()


def test_trial_frame_reads_convergence_and_counts_finite_input_samples():
    from analysis.report.collect import Sweep, Trial
    from analysis.report.table import trial_frame

    inputs = pd.DataFrame(
        {
            "eig_max": [2.0, 1.0, math.nan, 4.0],
            "eig_min": [-1.0, 0.5, math.nan, 0.1],
            "converged": [True, False, False, True],
        }
    )
    metrics = {"hessian/converged": 0.0, "input_hessian/converged_fraction": 0.5}
    trial = Trial(
        "r1", "t1", "64", "none", 0, metrics, 3, False, None, None, {"input_hessian": inputs}
    )
    sweep = Sweep("exp", "p1", "sweep", "FINISHED", "sqlite://", {}, (trial,))
    row = trial_frame(sweep).iloc[0]
    assert row["converged"] == 0.0 and row["input_converged"] == 0.5
    assert row["input_samples"] == 3  # the NaN row is no sample
    assert row["input_unconverged"] == 1 and row["input_nonfinite"] == 1
    assert row["min_eig_ratio"] == pytest.approx(-1.0 / 4.0)
