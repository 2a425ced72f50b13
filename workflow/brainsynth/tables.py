"""Summary tables (mean (std) per arm and class, with tests) and box plots.

Input is the long score table of :func:`brainsynth.metrics.score_cohort`
(columns ``... arm, subject, class, metric, value``), already filtered to one
experiment / task / test set (or split with ``by=`` in :func:`write_tables`).

Statistics
----------
Each cell is ``mean (std)`` over subjects, NaN values dropped, std with
``ddof=1`` (sample std; ``0`` printed for a single subject).  Every arm other
than ``reference_arm`` is compared with it, per class:

* ``"wilcoxon"``: :func:`scipy.stats.wilcoxon`, two-sided, paired by subject
  over the subjects with a value in both arms.
* ``"ttest"``: :func:`scipy.stats.ttest_ind`, two-sided, independent samples
  (``equal_var`` as given; scipy's default Student test).
* ``"auto"``: Wilcoxon when the two arms were scored on the same set of
  subjects, t-test otherwise.

A mark (``*``) is appended when ``p < alpha``.  No test is run (p = NaN, no
mark, no error) with fewer than 2 values per arm (t-test) or 2 pairs
(Wilcoxon), or when both arms have no spread (t-test undefined).  All-zero
paired differences give p = 1.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .errors import InputError
from .io import atomic_path, save_figure

MARK = "*"
NA_CELL = "n/a"
TESTS = ("auto", "ttest", "wilcoxon")
METRIC_LABELS = {
    "dice": "Dice",
    "precision": "Precision",
    "recall": "Recall",
    "accuracy": "Accuracy",
    "hd95": "HD95 (mm)",
    "fp_tum": "FP$_{tum}$ (%)",
}
_TEST_NAMES = {
    "wilcoxon": "two-sided Wilcoxon signed-rank test paired by subject",
    "ttest": "two-sided independent t-test",
}

__all__ = ["Summary", "summary_table", "compare", "write_tables", "boxplot", "fp_tum_plot",
           "latex_escape", "MARK"]


class Summary(NamedTuple):
    """Result of :func:`summary_table`; all frames have arms as rows, classes as columns."""

    table: pd.DataFrame      # 'mean (std)' strings with marks
    pvalues: pd.DataFrame    # float p-values vs reference (NaN: not tested / reference)
    tests: pd.DataFrame      # test used per cell ('wilcoxon', 'ttest', '' )
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame          # subjects with a value
    footnote: str


def _require(df, cols):
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"score table lacks columns {missing}",
                         fix="use the long table written by brainsynth.metrics.score_cohort")


def _ordered(values, order):
    present = list(dict.fromkeys(values))
    if order is None:
        return present
    return list(order)


def _series(df, arm, cls):
    """Subject-indexed values of one arm and class (NaN dropped)."""
    sel = df[(df["arm"] == arm) & (df["class"] == cls)]
    dup = sel["subject"].duplicated()
    if dup.any():
        subj = sel.loc[dup, "subject"].iloc[0]
        raise InputError(
            f"arm {arm!r}, class {cls!r} has several values for subject {subj!r}",
            fix="filter the table to one experiment/task/test set (or use by=...)",
        )
    return sel.set_index("subject")["value"].astype(float)


def compare(a, b, test="ttest", equal_var=True) -> float:
    """Two-sided p-value of ``a`` vs ``b`` (pd.Series indexed by subject); NaN if untestable."""
    from scipy import stats

    a = a.dropna()
    b = b.dropna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if test == "wilcoxon":
            common = a.index.intersection(b.index)
            if len(common) < 2:
                return float("nan")
            d = a.loc[common].to_numpy() - b.loc[common].to_numpy()
            if np.allclose(d, 0.0, rtol=0.0, atol=1e-12):
                return 1.0
            try:
                p = stats.wilcoxon(a.loc[common].to_numpy(), b.loc[common].to_numpy(),
                                   alternative="two-sided").pvalue
            except ValueError:
                return float("nan")
        elif test == "ttest":
            if len(a) < 2 or len(b) < 2:
                return float("nan")
            if np.ptp(a.to_numpy()) == 0 and np.ptp(b.to_numpy()) == 0:
                return float("nan")
            p = stats.ttest_ind(a.to_numpy(), b.to_numpy(), equal_var=equal_var,
                                alternative="two-sided").pvalue
        else:
            raise InputError(f"unknown test {test!r}", field="test", fix=f"use one of {TESTS}")
    p = float(p)
    return p if math.isfinite(p) else float("nan")


def _fmt(x, decimals):
    return f"{x:.{decimals}f}"


def _metric_rows(long_df, metric):
    """Rows of one metric from the long table; a clear error when there are none."""
    _require(long_df, ["arm", "subject", "class", "metric", "value"])
    df = long_df[long_df["metric"] == metric]
    if df.empty:
        raise InputError(f"no rows for metric {metric!r}",
                         fix=f"choose one of {sorted(long_df['metric'].unique())}")
    return df


def summary_table(long_df, metric, arms_order=None, reference_arm=None, test="auto",
                  alpha=0.05, classes=None, decimals=3, scale=1.0, equal_var=True) -> Summary:
    """Mean (std) of ``metric`` per arm (rows) and class (columns), marked vs a reference.

    ``arms_order`` / ``classes``: row / column order (default: order of first
    appearance).  ``reference_arm``: arm the others are tested against (None:
    no tests).  ``test``: ``'auto'``, ``'ttest'`` or ``'wilcoxon'`` (see the
    module docstring).  ``scale`` multiplies values before formatting (e.g.
    100 for percentages); p-values do not depend on it.
    """
    if test not in TESTS:
        raise InputError(f"unknown test {test!r}", field="test", fix=f"use one of {TESTS}")
    df = _metric_rows(long_df, metric)
    arms = _ordered(df["arm"], arms_order)
    cols = _ordered(df["class"], classes)
    if reference_arm is not None and reference_arm not in set(df["arm"]):
        raise InputError(f"reference arm {reference_arm!r} has no {metric} values",
                         field="reference_arm", fix=f"choose one of {sorted(set(df['arm']))}")

    shape = dict(index=pd.Index(arms, name="arm"), columns=pd.Index(cols, name="class"))
    table = pd.DataFrame(NA_CELL, dtype=object, **shape)
    pvals = pd.DataFrame(np.nan, dtype=float, **shape)
    tests = pd.DataFrame("", dtype=object, **shape)
    mean = pd.DataFrame(np.nan, dtype=float, **shape)
    std = pd.DataFrame(np.nan, dtype=float, **shape)
    n = pd.DataFrame(0, dtype=int, **shape)
    used = set()
    for c in cols:
        ref = _series(df, reference_arm, c) if reference_arm is not None else None
        ref_subjects = set(df.loc[(df["arm"] == reference_arm) & (df["class"] == c), "subject"]) \
            if reference_arm is not None else set()
        for a in arms:
            s = _series(df, a, c)
            v = s.dropna().to_numpy() * scale
            n.loc[a, c] = len(v)
            if len(v) == 0:
                continue
            m = float(np.mean(v))
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            mean.loc[a, c], std.loc[a, c] = m, sd
            cell = f"{_fmt(m, decimals)} ({_fmt(sd, decimals)})"
            if ref is not None and a != reference_arm:
                t = test
                if t == "auto":
                    subjects = set(df.loc[(df["arm"] == a) & (df["class"] == c), "subject"])
                    t = "wilcoxon" if subjects == ref_subjects else "ttest"
                p = compare(s, ref, t, equal_var=equal_var)
                pvals.loc[a, c] = p
                tests.loc[a, c] = t
                used.add(t)
                if p < alpha:
                    cell += MARK
            table.loc[a, c] = cell
    footnote = _footnote(metric, reference_arm, used, alpha, scale)
    return Summary(table, pvals, tests, mean, std, n, footnote)


def _footnote(metric, reference_arm, used, alpha, scale):
    unit = " (in %)" if scale == 100 else (f" (values x{scale:g})" if scale != 1 else "")
    txt = f"{metric}: mean (std) over test subjects{unit}."
    if reference_arm is None:
        return txt + " No significance tests."
    names = " / ".join(_TEST_NAMES[t] for t in sorted(used)) or "no test possible"
    return (txt + f" {MARK} p < {alpha:g} vs reference arm '{reference_arm}' ({names}); "
            "no mark: not significant or not testable.")


# --------------------------------------------------------------------------- writers

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
}


def latex_escape(text) -> str:
    """Escape LaTeX special characters (``_`` -> ``\\_`` etc.)."""
    return re.sub(r"[\\&%$#_{}~^<>]", lambda m: _LATEX_SPECIAL[m.group()], str(text))


def _to_latex(table, footnote, caption=None):
    ncol = table.shape[1]
    lines = [
        "% generated by brainsynth.tables",
        r"\begin{tabular}{l" + "c" * ncol + "}",
        r"\hline",
        " & ".join([latex_escape(table.index.name or "")] + [latex_escape(c) for c in table.columns])
        + r" \\",
        r"\hline",
    ]
    for arm, row in table.iterrows():
        lines.append(" & ".join([latex_escape(arm)] + [latex_escape(v) for v in row]) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    if caption:
        lines.insert(1, "% " + caption)
    lines.append(r"\par\smallskip{\footnotesize " + latex_escape(footnote) + "}")
    return "\n".join(lines) + "\n"


def _to_markdown(table, footnote, title=None):
    md = table.reset_index().to_markdown(index=False)
    head = f"**{title}**\n\n" if title else ""
    return head + md + "\n\n" + footnote + "\n"


def _write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def _safe(s):
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(s)).strip("-") or "x"


def write_tables(long_df, out_dir, metrics=None, arms_order=None, reference_arm=None,
                 test="auto", alpha=0.05, classes=None, by=None, decimals=None,
                 equal_var=True) -> dict:
    """Write ``{stem}.csv/.md/.tex`` and ``{stem}_pvalues.csv`` per metric, atomically.

    ``stem`` is the metric name, prefixed with the values of the ``by``
    columns (joined by ``_``) when ``by`` splits the table into groups.
    ``metrics`` default: every metric but the voxel counts.  ``decimals``:
    int or ``{metric: int}`` (default 3, 2 for hd95 and fp_tum).  The CSV holds
    the bare table (arm column + one column per class); the footnote (marks and
    test used) ends the Markdown and LaTeX files.  fp_tum is shown in %.
    Returns ``{stem: {"csv", "md", "tex", "pvalues"}: Path}``.
    """
    _require(long_df, ["arm", "subject", "class", "metric", "value"])
    out_dir = Path(out_dir)
    if metrics is None:
        metrics = [m for m in dict.fromkeys(long_df["metric"]) if m not in ("truth_voxels", "pred_voxels")]
    by = [by] if isinstance(by, str) else list(by or [])
    _require(long_df, by)
    groups = long_df.groupby(by, sort=False, dropna=False) if by else [((), long_df)]
    written = {}
    for key, gdf in groups:
        key = key if isinstance(key, tuple) else (key,)
        prefix = "_".join(_safe(k) for k in key)
        for metric in metrics:
            if not (gdf["metric"] == metric).any():
                continue
            if isinstance(decimals, dict):
                dec = decimals.get(metric, 3)
            elif decimals is not None:
                dec = decimals
            else:
                dec = 2 if metric in ("hd95", "fp_tum") else 3
            scale = 100.0 if metric == "fp_tum" else 1.0
            s = summary_table(gdf, metric, arms_order=arms_order, reference_arm=reference_arm,
                              test=test, alpha=alpha, classes=classes, decimals=dec, scale=scale,
                              equal_var=equal_var)
            stem = f"{prefix}_{metric}" if prefix else metric
            title = " / ".join(str(k) for k in key)
            title = f"{title} - {metric}" if title else metric
            paths = {
                "csv": out_dir / f"{stem}.csv",
                "md": out_dir / f"{stem}.md",
                "tex": out_dir / f"{stem}.tex",
                "pvalues": out_dir / f"{stem}_pvalues.csv",
            }
            with atomic_path(paths["csv"]) as tmp:
                s.table.to_csv(tmp)
            with atomic_path(paths["pvalues"]) as tmp:
                s.pvalues.to_csv(tmp)
            _write_text(paths["md"], _to_markdown(s.table, s.footnote, title))
            _write_text(paths["tex"], _to_latex(s.table, s.footnote, title))
            written[stem] = paths
    return written


# --------------------------------------------------------------------------- figures

def boxplot(long_df, metric, out_path, arms_order=None, classes=None, reference_arm=None,
            test="auto", alpha=0.05, scale=1.0, ylabel=None, title=None, dpi=150):
    """Box plots of ``metric``: one panel per class, one box per arm (x axis).

    Subject values are overlaid as points.  With ``reference_arm`` the arms
    that differ significantly (as in :func:`summary_table`) get a ``*`` above
    their box.  Saved atomically (format from the suffix); returns the path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    df = _metric_rows(long_df, metric)
    arms = _ordered(df["arm"], arms_order)
    cols = _ordered(df["class"], classes)
    pv = None
    if reference_arm is not None:
        pv = summary_table(df, metric, arms, reference_arm, test=test, alpha=alpha,
                           classes=cols).pvalues
    ncols = min(len(cols), 4)
    nrows = math.ceil(len(cols) / ncols)
    width = max(3.0, 0.55 * len(arms) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.4 * nrows),
                             squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    colours = plt.get_cmap("tab10")
    panels = []
    for c in cols:
        data, pos = [], []
        for j, a in enumerate(arms):
            v = df.loc[(df["arm"] == a) & (df["class"] == c), "value"].astype(float).dropna()
            v = v.to_numpy() * scale
            if len(v):
                data.append(v)
                pos.append(j)
        panels.append((c, data, pos))
    values = [v for _, data, _ in panels for v in data]
    # the y axis is shared: marks and head room come from the range of every panel
    top = max((float(np.max(v)) for v in values), default=1.0)
    span = (top - min((float(np.min(v)) for v in values), default=0.0)) or 1.0
    for i, (c, data, pos) in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        if data:
            bp = ax.boxplot(data, positions=pos, widths=0.6, patch_artist=True,
                            showfliers=False, medianprops={"color": "black"})
            for patch, j in zip(bp["boxes"], pos):
                patch.set_facecolor(colours(j % 10))
                patch.set_alpha(0.55)
            for v, j in zip(data, pos):
                ax.plot(j + rng.uniform(-0.15, 0.15, len(v)), v, "o", ms=2.5, color="0.2",
                        alpha=0.7)
            if pv is not None:
                for v, j in zip(data, pos):
                    if pv.loc[arms[j], c] < alpha:
                        ax.text(j, float(np.max(v)) + 0.03 * span, MARK, ha="center",
                                va="bottom", fontsize=12)
        ax.set_title(str(c))
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([str(a) for a in arms], rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if i % ncols == 0:
            ax.set_ylabel(ylabel or METRIC_LABELS.get(metric, metric))
    if pv is not None:
        axes[0][0].set_ylim(top=top + 0.15 * span)
    for k in range(len(cols), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=dpi)


def fp_tum_plot(long_df, out_path, arms_order=None, reference_arm=None, test="auto",
                alpha=0.05, title=None, dpi=150):
    """Box plot of FP_tum (% of tumour voxels labelled WMH) per arm."""
    from .metrics import FP_TUM_METRIC

    return boxplot(long_df, FP_TUM_METRIC, out_path, arms_order=arms_order,
                   reference_arm=reference_arm, test=test, alpha=alpha, scale=100.0,
                   ylabel="tumour voxels labelled WMH (%)", title=title, dpi=dpi)
