import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from brainsynth.errors import InputError
from brainsynth.tables import (
    MARK,
    boxplot,
    compare,
    fp_tum_plot,
    latex_escape,
    summary_table,
    write_tables,
)


def long_rows(arm, subjects, cls, values, metric="dice", **meta):
    return [dict(meta, arm=arm, subject=s, **{"class": cls}, metric=metric, value=float(v))
            for s, v in zip(subjects, values)]


def paired_df():
    """Three arms scored on the same 8 subjects; 'synth' clearly worse, 'copy' identical."""
    rng = np.random.default_rng(0)
    subj = [f"s{i:02d}" for i in range(8)]
    real = 0.80 + 0.02 * rng.standard_normal(8)
    rows = []
    for cls, shift in (("wmh", 0.0), ("csf", 0.05)):
        rows += long_rows("real", subj, cls, real + shift)
        rows += long_rows("copy", subj, cls, real + shift)
        rows += long_rows("synth", subj, cls, real + shift - 0.3 + 0.01 * rng.standard_normal(8))
    return pd.DataFrame(rows)


def test_mean_std_strings():
    df = pd.DataFrame(long_rows("a", ["x", "y", "z"], "wmh", [0.1, 0.2, 0.6])
                      + long_rows("b", ["x", "y"], "wmh", [0.5, 0.5]))
    s = summary_table(df, "dice", decimals=2)
    # mean 0.3, sample std sqrt(((-.2)^2 + (-.1)^2 + .3^2)/2) = sqrt(0.07) = 0.2646
    assert s.table.loc["a", "wmh"] == "0.30 (0.26)"
    assert s.table.loc["b", "wmh"] == "0.50 (0.00)"
    assert s.mean.loc["a", "wmh"] == pytest.approx(0.3)
    assert s.std.loc["a", "wmh"] == pytest.approx(np.sqrt(0.07))
    assert s.n.loc["a", "wmh"] == 3
    assert s.pvalues.isna().all().all()
    assert "No significance" in s.footnote


def test_nan_dropped_and_single_value():
    df = pd.DataFrame(long_rows("a", ["x", "y"], "wmh", [0.4, np.nan]))
    s = summary_table(df, "dice", decimals=1)
    assert s.table.loc["a", "wmh"] == "0.4 (0.0)" and s.n.loc["a", "wmh"] == 1


def test_paired_wilcoxon_chosen_and_marks():
    df = paired_df()
    s = summary_table(df, "dice", arms_order=["real", "copy", "synth"], reference_arm="real")
    assert list(s.table.index) == ["real", "copy", "synth"]
    assert list(s.table.columns) == ["wmh", "csf"]
    assert (s.tests.loc[["copy", "synth"]] == "wilcoxon").all().all()
    assert s.tests.loc["real"].eq("").all()
    for c in ("wmh", "csf"):
        assert s.table.loc["synth", c].endswith(MARK)
        assert s.pvalues.loc["synth", c] < 0.05
        assert not s.table.loc["copy", c].endswith(MARK)
        assert s.pvalues.loc["copy", c] == 1.0
        assert not s.table.loc["real", c].endswith(MARK)
    assert "Wilcoxon" in s.footnote and "'real'" in s.footnote


def test_ttest_when_subjects_differ():
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        long_rows("real", [f"a{i}" for i in range(10)], "wmh", 0.8 + 0.02 * rng.standard_normal(10))
        + long_rows("synth", [f"b{i}" for i in range(10)], "wmh", 0.5 + 0.02 * rng.standard_normal(10))
        + long_rows("same", [f"c{i}" for i in range(10)], "wmh", 0.8 + 0.02 * rng.standard_normal(10))
    )
    s = summary_table(df, "dice", reference_arm="real")
    assert s.tests.loc["synth", "wmh"] == "ttest" and s.tests.loc["same", "wmh"] == "ttest"
    assert s.table.loc["synth", "wmh"].endswith(MARK)
    assert s.pvalues.loc["same", "wmh"] > 0.05 and not s.table.loc["same", "wmh"].endswith(MARK)
    assert "t-test" in s.footnote
    # forcing a test overrides auto
    forced = summary_table(paired_df(), "dice", reference_arm="real", test="ttest")
    assert (forced.tests.loc[["copy", "synth"]] == "ttest").all().all()


def test_degenerate_cases_do_not_crash():
    # constant identical values, too few samples, missing class for one arm
    df = pd.DataFrame(
        long_rows("real", ["a", "b", "c"], "wmh", [1.0, 1.0, 1.0])
        + long_rows("same", ["d", "e", "f"], "wmh", [1.0, 1.0, 1.0])
        + long_rows("one", ["g"], "wmh", [0.1])
        + long_rows("real", ["a", "b", "c"], "csf", [0.5, 0.6, 0.7])
    )
    s = summary_table(df, "dice", reference_arm="real", arms_order=["real", "same", "one", "ghost"])
    assert np.isnan(s.pvalues.loc["same", "wmh"]) and not s.table.loc["same", "wmh"].endswith(MARK)
    assert np.isnan(s.pvalues.loc["one", "wmh"]) and not s.table.loc["one", "wmh"].endswith(MARK)
    assert s.table.loc["same", "csf"] == "n/a" and s.table.loc["ghost", "wmh"] == "n/a"
    assert np.isnan(compare(pd.Series([0.5], index=["a"]), pd.Series([0.4], index=["a"]), "wilcoxon"))


def test_errors():
    df = paired_df()
    with pytest.raises(InputError, match="reference arm"):
        summary_table(df, "dice", reference_arm="nope")
    with pytest.raises(InputError, match="metric"):
        summary_table(df, "hd95")
    with pytest.raises(InputError, match="test"):
        summary_table(df, "dice", test="anova")
    dup = pd.concat([df, df])
    with pytest.raises(InputError, match="several values"):
        summary_table(dup, "dice", reference_arm="real")


def test_latex_escape():
    assert latex_escape("deep_gm & 5% #1 p < 1") == r"deep\_gm \& 5\% \#1 p \textless{} 1"


def _full_df():
    df = paired_df()
    df["class"] = df["class"].replace({"csf": "deep_gm"})
    fp = pd.DataFrame(long_rows("real", [f"s{i:02d}" for i in range(8)], "tumour",
                                np.linspace(0, 0.1, 8), metric="fp_tum"))
    counts = df.assign(metric="truth_voxels", value=100.0)
    out = pd.concat([df, fp, counts], ignore_index=True)
    out["test_set"] = "internal"
    return out


def test_write_tables(tmp_path):
    df = _full_df()
    written = write_tables(df, tmp_path, arms_order=["real", "copy", "synth"], reference_arm="real")
    assert set(written) == {"dice", "fp_tum"}  # voxel counts skipped
    p = written["dice"]
    # CSV
    t = pd.read_csv(p["csv"], index_col=0)
    assert list(t.index) == ["real", "copy", "synth"] and list(t.columns) == ["wmh", "deep_gm"]
    assert re.fullmatch(r"\d\.\d{3} \(\d\.\d{3}\)\*", t.loc["synth", "wmh"])
    pv = pd.read_csv(p["pvalues"], index_col=0)
    assert pv.loc["synth", "wmh"] < 0.05 and np.isnan(pv.loc["real", "wmh"])
    # Markdown: a pipe table with header, separator, 3 rows, then the footnote
    md = p["md"].read_text().strip().splitlines()
    table_lines = [ln for ln in md if ln.startswith("|")]
    assert len(table_lines) == 5
    assert all(ln.count("|") == 4 for ln in table_lines)
    assert "synth" in table_lines[4] and MARK in table_lines[4]
    assert "Wilcoxon" in md[-1]
    # LaTeX: balanced tabular, 3 columns, escaped underscore, footnote
    tex = p["tex"].read_text()
    assert tex.count(r"\begin{tabular}{lcc}") == 1 and tex.count(r"\end{tabular}") == 1
    rows = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
    assert len(rows) == 4 and all(ln.count("&") - ln.count(r"\&") == 2 for ln in rows)
    assert r"deep\_gm" in tex and "deep_gm" not in tex.replace(r"deep\_gm", "")
    assert r"\footnotesize" in tex
    # fp_tum in percent with 2 decimals
    fp = pd.read_csv(written["fp_tum"]["csv"], index_col=0)
    assert fp.loc["real", "tumour"].startswith("5.00 (")
    # no temporary files left behind
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_write_tables_by_group(tmp_path):
    a = _full_df()
    b = a.assign(test_set="external")
    written = write_tables(pd.concat([a, b]), tmp_path, metrics=["dice"], by="test_set",
                           reference_arm="real")
    assert set(written) == {"internal_dice", "external_dice"}
    assert (tmp_path / "external_dice.tex").exists()
    with pytest.raises(InputError, match="several values"):
        write_tables(pd.concat([a, b]), tmp_path / "x", metrics=["dice"], reference_arm="real")


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    return data


def test_boxplot_png(tmp_path):
    df = _full_df()
    out = boxplot(df, "dice", tmp_path / "fig" / "dice.png", arms_order=["real", "copy", "synth"],
                  reference_arm="real", title="internal test set", dpi=80)
    _check_png(out)
    out2 = fp_tum_plot(df, tmp_path / "fp_tum.png", dpi=80)
    _check_png(out2)
    with pytest.raises(InputError):
        boxplot(df, "hd95", tmp_path / "none.png")


def test_boxplot_shared_axis_shows_every_panel_and_marks(tmp_path, monkeypatch):
    """Panels on one shared y axis with very different ranges: nothing is clipped."""
    import brainsynth.tables as T

    rng = np.random.default_rng(3)
    rows = []
    for s in range(12):
        for arm, shift in (("R", 0.0), ("S", 0.5)):
            rows.append({"subject": f"s{s}", "arm": arm, "class": "small", "metric": "dice",
                         "value": 0.05 + 0.02 * rng.random() + 0.01 * shift})
            rows.append({"subject": f"s{s}", "arm": arm, "class": "large", "metric": "dice",
                         "value": 0.4 + shift + 0.02 * rng.random()})
    df = pd.DataFrame(rows)
    seen = {}

    def spy(fig, path, **kw):
        seen["axes"] = [ax for ax in fig.axes if ax.get_visible()]
        seen["texts"] = [t.get_text() for ax in seen["axes"] for t in ax.texts]
        return save_figure(fig, path, **kw)

    save_figure = T.save_figure
    monkeypatch.setattr(T, "save_figure", spy)
    T.boxplot(df, "dice", tmp_path / "b.png", arms_order=["R", "S"], classes=["large", "small"],
              reference_arm="R", dpi=60)
    assert len(seen["axes"]) == 2
    for ax in seen["axes"]:
        lo, hi = ax.get_ylim()
        assert lo <= df["value"].min() and hi >= df["value"].max() + 0.03 * (df["value"].max() - df["value"].min())
    assert seen["texts"].count(T.MARK) == 2  # S differs from R in both classes (paired, n=12)
