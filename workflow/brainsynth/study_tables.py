"""The study's tables and figures: one experiment's arms side by side, marked as in brainSPADE.

Why a layout of its own: the generic tables (:mod:`brainsynth.tables`) test every arm
against one reference; the study marks the *better* arm of each comparison. Here every
column is one (test set, class, metric); every pair of arms is tested on the subjects
of that test set (:func:`brainsynth.tables.compare`: Wilcoxon signed-rank paired by
subject, or the independent t-test), and a cell is marked

* ``**`` when its arm is significantly better than every other arm of the table except
  the ``upper_bound_arms`` (the study's R_*-OD: real data of the target domain), with
  at least two such arms;
* ``*`` when its arm is significantly better than the reference arm, or, for the
  reference arm itself, than every other arm (the better of a pair in Table 1.2).

"Better" is a higher mean for overlap metrics and a lower one for distances and
false-positive shares (:data:`LOWER_IS_BETTER`).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pandas as pd

from .errors import InputError
from .io import atomic_path, save_figure
from .tables import METRIC_LABELS, _TEST_NAMES, _series, _to_latex, _to_markdown, _write_text, compare

LOWER_IS_BETTER = {"hd95", "fp_tum"}
PERCENT_METRICS = {"fp_tum"}
LAYOUTS = ("table", "figure")


def experiment_columns(long_df, test_sets, metrics):
    """``[(test set, class, metric)]`` present in ``long_df``, in the order test set, metric, class.

    ``metrics``: a list for every test set, or ``{test set: [metrics]}`` (E4: Dice on the
    WMH test set, FP_tum on the tumour one)."""
    cols = []
    for ts in test_sets:
        wanted = metrics.get(ts, []) if isinstance(metrics, dict) else metrics
        sub = long_df[long_df["test_set"] == ts]
        for m in wanted:
            for c in dict.fromkeys(sub.loc[sub["metric"] == m, "class"]):
                cols.append((ts, c, m))
    if not cols:
        raise InputError(f"no scores for test sets {list(test_sets)} and metrics {metrics}",
                         field="segmentation.experiment_definitions",
                         fix="check the experiment's test_sets and metrics against its task")
    return cols


def column_name(ts, cls, metric, n_test_sets, n_metrics):
    """``[test set] class [metric]``: the test set and metric only where the table has several."""
    return " ".join(([ts] if n_test_sets > 1 else []) + [cls] + ([metric] if n_metrics > 1 else []))


def check_experiment(name, spec, task_arms, task_test_sets, metrics_available):
    """An experiment definition against the run's design: its task runs, its arms are the
    task's, its test sets are the task's, its metrics are scored; InputError naming the field."""
    field = f"segmentation.experiment_definitions.{name}"
    unknown = set(spec) - {"title", "paper_name", "task", "arms", "test_sets", "metrics", "layout",
                           "reference_arm", "upper_bound_arms"}
    if unknown:
        raise InputError(f"unknown keys {sorted(unknown)}", field=field,
                         fix="use title, paper_name, task, arms, test_sets, metrics, layout, reference_arm, "
                             "upper_bound_arms")
    task = spec.get("task")
    if task not in task_arms:
        raise InputError(f"task {task!r} is not run", field=f"{field}.task",
                         fix=f"name a task of segmentation.tasks ({sorted(task_arms)})")
    stray = [a for a in spec.get("arms") or [] if a not in task_arms[task]]
    if not spec.get("arms") or stray:
        raise InputError(f"arms {stray or '[]'} are not arms the task {task!r} runs ({task_arms[task]})",
                         field=f"{field}.arms", fix="list arms of segmentation.arms that the task runs")
    stray = [a for a in list(spec.get("upper_bound_arms") or []) + [spec.get("reference_arm")]
             if a is not None and a not in spec["arms"]]
    if stray:
        raise InputError(f"arms {stray} are not arms of the experiment", field=f"{field}.reference_arm / "
                         "upper_bound_arms", fix=f"name arms of {spec['arms']}")
    sets = spec.get("test_sets") or []
    stray = [t for t in sets if t not in task_test_sets[task]]
    if not sets or stray:
        raise InputError(f"test sets {stray or '[]'} are not scored for task {task!r} "
                         f"({list(task_test_sets[task])})", field=f"{field}.test_sets",
                         fix="name test sets of the task")
    metrics = spec.get("metrics") or ["dice"]
    listed = [m for ms in (metrics.values() if isinstance(metrics, dict) else [metrics]) for m in ms]
    stray = [m for m in listed if m not in metrics_available]
    if isinstance(metrics, dict):
        stray += [t for t in metrics if t not in sets]
    if stray:
        raise InputError(f"{stray} are not metrics scored for the task (or test sets of the experiment)",
                         field=f"{field}.metrics", fix=f"use {sorted(metrics_available)}")
    if spec.get("layout", "table") not in LAYOUTS:
        raise InputError(f"layout {spec.get('layout')!r} is not one of {list(LAYOUTS)}", field=f"{field}.layout")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", str(spec.get("paper_name", name))):
        raise InputError(f"paper_name {spec.get('paper_name')!r} is not a file name", field=f"{field}.paper_name",
                         fix="letters, digits, '_', '.', '-'")


def experiment_table(long_df, arms, test_sets, metrics, reference_arm=None, upper_bound_arms=(),
                     test="auto", alpha=0.05, decimals=3):
    """``(table, pvalues, footnote)``: rows ``arms``, one column per (test set, class, metric),
    cells ``mean (std)`` with the marks of the module docstring; ``pvalues`` is the long
    table of every pairwise test (test set, class, metric, arm_a, arm_b, test, p)."""
    missing = [a for a in arms if a not in set(long_df["arm"])]
    if missing:
        raise InputError(f"arms {missing} have no scores", field="segmentation.experiment_definitions",
                         fix="list arms the experiment's task runs")
    reference_arm = reference_arm if reference_arm in arms else arms[0]
    cols = experiment_columns(long_df, test_sets, metrics)
    n_sets = len({c[0] for c in cols})
    n_metrics = len({c[2] for c in cols})
    names = [column_name(ts, c, m, n_sets, n_metrics) for ts, c, m in cols]
    table = pd.DataFrame("n/a", index=pd.Index(arms, name="arm"), columns=names, dtype=object)
    prows, used = [], set()
    for (ts, cls, metric), name in zip(cols, names):
        df = long_df[(long_df["test_set"] == ts) & (long_df["metric"] == metric)]
        series = {a: _series(df, a, cls) for a in arms}
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        better = {}
        for a, b in itertools.combinations(arms, 2):
            sa, sb = series[a].dropna(), series[b].dropna()
            t = test
            if t == "auto":
                t = "wilcoxon" if set(sa.index) == set(sb.index) else "ttest"
            p = compare(sa, sb, t)
            if not math.isnan(p):
                used.add(t)
            prows.append({"test_set": ts, "class": cls, "metric": metric, "arm_a": a, "arm_b": b,
                          "test": t, "p": p})
            if p < alpha and len(sa) and len(sb):
                diff = sign * (float(sa.mean()) - float(sb.mean()))
                if diff > 0:
                    better.setdefault(a, set()).add(b)
                elif diff < 0:
                    better.setdefault(b, set()).add(a)
        for a in arms:
            v = series[a].dropna().to_numpy() * scale
            if not len(v):
                continue
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            cell = f"{np.mean(v):.{decimals}f} ({sd:.{decimals}f})"
            beats = better.get(a, set())
            rivals = [b for b in arms if b != a and b not in upper_bound_arms]
            if len(rivals) >= 2 and a not in upper_bound_arms and set(rivals) <= beats:
                cell += "**"
            elif (a != reference_arm and reference_arm in beats) or (
                    a == reference_arm and len(arms) > 1 and set(arms) - {a} <= beats):
                cell += "*"
            table.loc[a, name] = cell
    tests = " / ".join(_TEST_NAMES[t] for t in sorted(used)) or "no test possible"
    upper = f"; ** better than every arm except {', '.join(upper_bound_arms)}" if upper_bound_arms else \
        "; ** better than every other arm"
    units = "; fp_tum in % of true tumour voxels" if any(c[2] in PERCENT_METRICS for c in cols) else ""
    footnote = (f"mean (std) over test subjects{units}. * p < {alpha:g} and better than reference arm "
                f"'{reference_arm}' (for '{reference_arm}': better than every other arm){upper} ({tests}).")
    return table, pd.DataFrame(prows), footnote


def write_experiment(long_df, paths, arms, test_sets, metrics, title, reference_arm=None,
                     upper_bound_arms=(), test="auto", alpha=0.05, metric_definitions=""):
    """Write the experiment's csv / md / tex / pvalues (``paths``: those keys) atomically."""
    table, pvalues, footnote = experiment_table(long_df, arms, test_sets, metrics, reference_arm,
                                                upper_bound_arms, test, alpha)
    if metric_definitions:
        footnote = f"{footnote} {metric_definitions}"
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp)
    with atomic_path(paths["pvalues"]) as tmp:
        pvalues.to_csv(tmp, index=False)
    _write_text(paths["md"], _to_markdown(table, footnote, title))
    _write_text(paths["tex"], _to_latex(table, footnote, title))
    return table, pvalues


def experiment_figure(long_df, out_path, arms, test_sets, metrics, title, pvalues=None, alpha=0.05,
                      reference_arm=None, dpi=150):
    """Box plots, one panel per (test set, class, metric), one box per arm; a bracket with ``*``
    joins each arm that differs significantly from the reference arm (every pair when there is
    no reference), as in the study's Figs. 1.4 and 1.6; all pairs are in the p-value table."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = experiment_columns(long_df, test_sets, metrics)
    n = len(cols)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.2, 0.7 * len(arms) + 1.5) * ncols, 3.6 * nrows),
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    rng = np.random.default_rng(0)
    for i, (ts, cls, metric) in enumerate(cols):
        ax = axes[i // ncols][i % ncols]
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        df = long_df[(long_df["test_set"] == ts) & (long_df["metric"] == metric) & (long_df["class"] == cls)]
        data = [df.loc[df["arm"] == a, "value"].astype(float).dropna().to_numpy() * scale for a in arms]
        pos = [j for j, v in enumerate(data) if len(v)]
        if pos:
            bp = ax.boxplot([data[j] for j in pos], positions=pos, widths=0.6, patch_artist=True,
                            showfliers=False, medianprops={"color": "black"})
            for patch, j in zip(bp["boxes"], pos):
                patch.set_facecolor(colours(j % 10))
                patch.set_alpha(0.55)
            for j in pos:
                ax.plot(j + rng.uniform(-0.15, 0.15, len(data[j])), data[j], "o", ms=2.5, color="0.2", alpha=0.7)
            top = max(float(np.max(data[j])) for j in pos)
            span = (top - min(float(np.min(data[j])) for j in pos)) or 1.0
            level = 0
            if pvalues is not None and len(pvalues):
                sig = pvalues[(pvalues["test_set"] == ts) & (pvalues["class"] == cls) &
                              (pvalues["metric"] == metric) & (pvalues["p"] < alpha)]
                for a, b in zip(sig["arm_a"], sig["arm_b"]):
                    if reference_arm in arms and reference_arm not in (a, b):
                        continue
                    x0, x1 = arms.index(a), arms.index(b)
                    y = top + (0.08 + 0.1 * level) * span
                    ax.plot([x0, x0, x1, x1], [y - 0.02 * span, y, y, y - 0.02 * span], color="0.2", lw=0.8)
                    ax.text((x0 + x1) / 2, y, "*", ha="center", va="bottom")
                    level += 1
            ax.set_ylim(top=top + (0.15 + 0.1 * level) * span)
        ax.set_title(f"{cls}, {ts} test set", fontsize=9)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric) if metric != "fp_tum" else "FP_tum (%)")
        ax.grid(axis="y", alpha=0.3)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=dpi)
