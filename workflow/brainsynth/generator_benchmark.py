"""Generator benchmark: which generator's synthetic data helps segmentation, on one protocol.

Each comparison names a task, a test set, a real reference arm and arms that draw their
synthetic cases from the generators under test (their recipes' ``generator``). Per arm the
table gives the per-subject mean Dice over the task's classes (mean (std) over the test
subjects), the per-class means, the difference to the reference arm and the two-sided
Wilcoxon signed-rank p-value against it (paired by subject: every arm of a task is scored on
the same test subjects); per generator the image FID and k-NN precision / recall of its images
on the task's real-data nnU-Net encoder (as the synthesis audit's image FID), the quality of its
main-set samples (``generators.benchmark_quality``: MS-SSIM diversity in the task's modalities,
mean |Cohen's d| of tissue volumes against the training subjects, conditioning adherence,
nearest-training Dice and the share of samples closer to a training map than any held-out
subject) and its compute,
read from the Snakemake benchmark files of its jobs: training wall time (its own training and
the training of what it draws from), sampling wall time per volume and the peak resident
memory of those jobs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .errors import InputError
from .io import atomic_path, save_figure
from .tables import _to_latex, _to_markdown, _write_text, compare

REAL = "real"
FOOTNOTE = ("Dice: per-subject mean over the task's classes, mean (std) over the test subjects; "
            "delta: against the reference arm; p: two-sided Wilcoxon signed-rank test paired by subject; "
            "image FID, k-NN precision / recall: the generator's main-set images against the reference arm's "
            "real training images on the features of the task's real-data nnU-Net encoder (real rows: the "
            "held-out real images, the baseline; lesion_insertion's images are real training subjects with "
            "lesions, so they sit near that reference by construction); "
            "MS-SSIM: mean pairwise MS-SSIM among the generator's main-set images in the task's modalities "
            "(real rows: among the generators' real training images; lower = more diverse); |d| volumes: mean "
            "|Cohen's d| of the tissue volume fractions against the training subjects'; adherence: share of "
            "samples holding every requested lesion type and no other; nearest Dice: mean Dice of each "
            "sample to its nearest training map (real rows: held-out real subjects, the memorisation "
            "baseline), in brackets the share of samples closer to a training map than any held-out subject; "
            "compute from Snakemake benchmark files (training: wall time of the generator's training jobs "
            "and of those it draws from; sampling: wall time of its sampling job per volume, for gmm and "
            "spade_diffusion without the label maps they image, drawn by brainspade's sampling job; peak memory: "
            "largest max_rss of those jobs); n/a: not recorded.")


def read_benchmark(path):
    """``{"s", "max_rss"}`` of a Snakemake benchmark file (first repeat), None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    row = pd.read_csv(path, sep="\t").iloc[0]
    rss = pd.to_numeric(row.get("max_rss"), errors="coerce")
    return {"s": float(row["s"]), "max_rss": float(rss) if pd.notna(rss) else math.nan}


def generator_compute(training, sampling, n_volumes, bench_dir):
    """Compute of one generator from the benchmark files of its ``training`` jobs (names) and
    ``sampling`` job; NaN where a file is missing."""
    bench_dir = Path(bench_dir)
    records = {name: read_benchmark(bench_dir / f"{name}.tsv") for name in [*training, sampling]}
    train = [records[n] for n in training]
    sample = records[sampling]
    rss = [r["max_rss"] for r in records.values() if r is not None and not math.isnan(r["max_rss"])]
    complete = all(r is not None for r in records.values())
    return {
        "training_s": sum(r["s"] for r in train) if all(r is not None for r in train) else math.nan,
        "sampling_s_per_volume": sample["s"] / n_volumes if sample is not None and n_volumes else math.nan,
        # a job too short for the memory probe records NA; the others still bound the peak
        "peak_rss_mb": max(rss) if complete and rss else math.nan,
    }


def _subject_dice(scores, task, arm, test_set):
    rows = scores[(scores["task"] == task) & (scores["arm"] == arm) & (scores["test_set"] == test_set)
                  & (scores["metric"] == "dice")]
    if rows.empty:
        raise InputError(f"no Dice of arm {arm!r} on test set {test_set!r} in the scores",
                         field="generator_benchmark.comparisons", fix="name arms and test sets of the task")
    return rows.groupby("subject")["value"].mean(), rows.groupby("class", sort=False)["value"].mean()


QUALITY = ("image_fid", "image_precision", "image_recall")


def _quality(fid, task, generator):
    """FID / precision / recall of a generator's images on the task's real-data encoder; for the
    real reference arm, the held-out real images' (the baseline); NaN where not measured."""
    nan = dict.fromkeys(QUALITY, math.nan)
    if generator == REAL:
        tables = [t for (tk, _), t in fid.items() if tk == task]
        rows = tables[0][tables[0]["set"].str.startswith("held_out_real")] if tables else []
    else:
        table = fid.get((task, generator))
        rows = table[table["set"] == "synthetic"] if table is not None else []
    if len(rows) == 0:
        return nan
    row = rows.iloc[0]
    return {"image_fid": float(row["fid"]), "image_precision": float(row["precision"]),
            "image_recall": float(row["recall"])}


SAMPLE_QUALITY = ("ms_ssim", "volume_abs_d", "conditioning_adherence", "nearest_training_dice",
                  "closer_than_held_out")


def _sample_quality(quality, generator, modalities):
    """The :mod:`generators.benchmark_quality` figures of a generator's samples (MS-SSIM over
    ``modalities``); for the real reference arm, the real baselines of the same tables."""
    nan = dict.fromkeys(SAMPLE_QUALITY, math.nan)
    if generator == REAL:  # the real baselines: from a table that scored every modality asked
        table = next((t for t in quality.values() if modalities is None
                      or set(modalities) <= set(t.loc[t["measure"] == "ms_ssim", "item"])), None)
    else:
        table = quality.get(generator)
    if table is None:
        return nan
    col = "real" if generator == REAL else "synthetic"

    def pick(measure, items=None):
        rows = table[table["measure"] == measure]
        if items is not None:
            rows = rows[rows["item"].isin(list(items))]
        return float(rows[col].mean()) if len(rows) else math.nan

    out = {"ms_ssim": pick("ms_ssim", modalities), "nearest_training_dice": pick("nearest_training_dice")}
    if generator != REAL:
        out.update(volume_abs_d=pick("mean_abs_cohens_d"), conditioning_adherence=pick("conditioning_adherence"),
                   closer_than_held_out=pick("closer_than_held_out"))
    return {**nan, **out}


def benchmark_table(scores, comparisons, arms, compute, fid=None, quality=None, task_modalities=None):
    """One row per (comparison, arm): the reference arm first, then the compared arms.

    ``scores``: long scores of every arm named (columns arm, test_set, subject, class, metric,
    value); ``arms``: arm -> {"generator", "n_real", "n_synthetic"}; ``compute``: generator ->
    :func:`generator_compute`; ``fid``: (task, generator) -> the image FID table of that
    generator's main-set images (rows held_out_real ..., synthetic); ``quality``: generator ->
    its :func:`generators.benchmark_quality.generator_quality` table; ``task_modalities``: task
    -> the modalities its MS-SSIM is read in (default: all in the table)."""
    fid, quality, task_modalities = fid or {}, quality or {}, task_modalities or {}
    rows = []
    for comp in comparisons:
        ref, _ = _subject_dice(scores, comp["task"], comp["reference"], comp["test_set"])
        for arm in [comp["reference"], *comp["arms"]]:
            per_subject, per_class = _subject_dice(scores, comp["task"], arm, comp["test_set"])
            info = arms[arm]
            generator = info["generator"] if info["n_synthetic"] else REAL
            row = {"task": comp["task"], "test_set": comp["test_set"], "arm": arm,
                   "reference": arm == comp["reference"], "generator": generator,
                   "n_real": info["n_real"], "n_synthetic": info["n_synthetic"], "n_test": int(per_subject.size),
                   "dice_mean": float(per_subject.mean()),
                   "dice_std": float(per_subject.std(ddof=1)) if per_subject.size > 1 else 0.0,
                   "delta_vs_reference": float(per_subject.mean() - ref.mean()),
                   "p_vs_reference": (math.nan if arm == comp["reference"]
                                      else compare(per_subject, ref, test="wilcoxon")),
                   **{f"dice_{c}": float(v) for c, v in per_class.items()}}
            row.update(_quality(fid, comp["task"], generator))
            row.update(_sample_quality(quality, generator, task_modalities.get(comp["task"])))
            row.update(compute.get(generator, dict.fromkeys(("training_s", "sampling_s_per_volume",
                                                              "peak_rss_mb"), math.nan)))
            rows.append(row)
    return pd.DataFrame(rows)


def _display(table):
    def fmt(x, d=3):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"

    out = pd.DataFrame({
        # plain lists: Series would align on the table's index, not the arm index below
        "task / test set": (table["task"] + " / " + table["test_set"]).tolist(),
        "generator": table["generator"].tolist(),
        "real + synthetic": (table["n_real"].astype(str) + " + " + table["n_synthetic"].astype(str)).tolist(),
        "Dice": [f"{m:.3f} ({s:.3f})" for m, s in zip(table["dice_mean"], table["dice_std"])],
        "delta": ["" if r else fmt(d) for d, r in zip(table["delta_vs_reference"], table["reference"])],
        "p": ["" if r else fmt(p, 4) for p, r in zip(table["p_vs_reference"], table["reference"])],
        "image FID": [fmt(v, 3) for v in table["image_fid"]],
        "precision / recall": [f"{fmt(p, 2)} / {fmt(r, 2)}" for p, r in zip(table["image_precision"],
                                                                          table["image_recall"])],
        "MS-SSIM": [fmt(v, 3) for v in table["ms_ssim"]],
        "|d| volumes": [fmt(v, 2) if g != REAL else "" for v, g in zip(table["volume_abs_d"], table["generator"])],
        "adherence": [fmt(v, 2) if g != REAL else "" for v, g in zip(table["conditioning_adherence"],
                                                                    table["generator"])],
        "nearest Dice (closer)": [fmt(d, 3) + ("" if g == REAL else f" ({fmt(c, 2)})") for d, c, g in
                                  zip(table["nearest_training_dice"], table["closer_than_held_out"],
                                      table["generator"])],
        "training (s)": [fmt(v, 0) if g != REAL else "" for v, g in zip(table["training_s"], table["generator"])],
        "sampling (s/volume)": [fmt(v, 2) if g != REAL else ""
                                for v, g in zip(table["sampling_s_per_volume"], table["generator"])],
        "peak memory (MB)": [fmt(v, 0) if g != REAL else "" for v, g in zip(table["peak_rss_mb"], table["generator"])],
    }, index=pd.Index(table["arm"], name="arm"))
    return out


def benchmark_figure(scores, comparisons, arms, path):
    """Per comparison, per-subject mean Dice of each arm, coloured by generator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generators = sorted({arms[a]["generator"] if arms[a]["n_synthetic"] else REAL
                         for c in comparisons for a in [c["reference"], *c["arms"]]})
    colours = dict(zip(generators, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(comparisons), figsize=(3.2 * len(comparisons) + 1, 3.4), squeeze=False)
    for ax, comp in zip(axes[0], comparisons):
        names = [comp["reference"], *comp["arms"]]
        data = [_subject_dice(scores, comp["task"], a, comp["test_set"])[0].to_numpy() for a in names]
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, a in zip(box["boxes"], names):
            patch.set_facecolor(colours[arms[a]["generator"] if arms[a]["n_synthetic"] else REAL])
        ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{comp['task']} / {comp['test_set']}", fontsize=8)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel("Dice (mean over classes)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[g]) for g in generators]
    fig.legend(handles, generators, loc="upper right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return save_figure(fig, path, dpi=120)


def write_benchmark(scores, comparisons, arms, compute, paths, fid=None, quality=None, task_modalities=None):
    """The table as csv / md / tex and the figure (``paths``: csv, md, tex, figure)."""
    if not comparisons:
        raise InputError("no comparison to benchmark", field="generator_benchmark.comparisons",
                         fix="list {task, test_set, reference, arms} entries")
    table = benchmark_table(scores, comparisons, arms, compute, fid, quality, task_modalities)
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    shown = _display(table)
    title = "Generator benchmark: downstream Dice against the real reference arm, and compute"
    _write_text(paths["md"], _to_markdown(shown, FOOTNOTE, title=title))
    _write_text(paths["tex"], _to_latex(shown, FOOTNOTE, caption=title))
    benchmark_figure(scores, comparisons, arms, paths["figure"])
    return table


def check_comparisons(comparisons, task_arms, task_test_sets):
    """Parse-time check of ``generator_benchmark.comparisons``; returns the problems found."""
    problems = []
    for i, comp in enumerate(comparisons or []):
        field = f"generator_benchmark.comparisons[{i}]"
        missing = [k for k in ("task", "test_set", "reference", "arms") if k not in comp]
        if missing:
            problems.append(InputError(f"lacks {missing}", field=field, fix="give task, test_set, reference, arms"))
            continue
        if comp["task"] not in task_arms:
            problems.append(InputError(f"task {comp['task']!r} does not run", field=f"{field}.task",
                                       fix=f"use one of {sorted(task_arms)}"))
            continue
        stray = [a for a in [comp["reference"], *comp["arms"]] if a not in task_arms[comp["task"]]]
        if stray:
            problems.append(InputError(f"arms {stray} are not arms of task {comp['task']!r}", field=f"{field}.arms",
                                       fix=f"use arms of the task: {task_arms[comp['task']]}"))
        if comp["test_set"] not in task_test_sets[comp["task"]]:
            problems.append(InputError(f"test set {comp['test_set']!r} is not one of task {comp['task']!r}",
                                       field=f"{field}.test_set", fix=f"use one of {task_test_sets[comp['task']]}"))
    return problems



# --------------------------------------------------------------------------- value of synthetic data
VALUE_CURVE_DEFAULTS = {"ratios": [0, 0.5, 1, 2, 4], "real_fractions": [0.05, 0.25, 1.0],
                        "fraction_synthetic": 1.0, "seeds": [0, 1]}
VALUE_CURVE_FOOTNOTE = (
    "Dice: per-subject mean over the task's classes, averaged over the test subjects, per nnU-Net seed; "
    "mean, std, min and max over the seeds (the training cases are the same for every seed, so the spread "
    "is nnU-Net's own); synthetic_ratio: synthetic cases per real case of the whole real pool; "
    "real_fraction: share of the real pool in the arm; real rows: no synthetic case.")


def _pct(x):
    return f"{int(round(float(x) * 100)):03d}"


def value_curve_config(curve):
    """``generator_benchmark.value_curve`` over :data:`VALUE_CURVE_DEFAULTS` (task, test_set and
    generators have no default)."""
    out = {**VALUE_CURVE_DEFAULTS, **(curve or {})}
    field = "generator_benchmark.value_curve"
    missing = [k for k in ("task", "test_set", "generators") if not out.get(k)]
    if missing:
        raise InputError(f"lacks {missing}", field=field, fix="give task, test_set and generators")
    if any(float(f) <= 0 or float(f) > 1 for f in out["real_fractions"]):
        raise InputError(f"real_fractions {out['real_fractions']} must lie in (0, 1]", field=f"{field}.real_fractions",
                         fix="e.g. [0.05, 0.25, 1.0]")
    if any(float(r) < 0 for r in out["ratios"]) or float(out["fraction_synthetic"]) <= 0:
        raise InputError("ratios must be >= 0 and fraction_synthetic > 0", field=field, fix="e.g. ratios [0, 1, 2]")
    if len(set(out["seeds"])) != len(out["seeds"]) or not out["seeds"]:
        raise InputError(f"seeds {out['seeds']} must be distinct and at least one", field=f"{field}.seeds",
                         fix="e.g. [0, 1]")
    return out


def value_curve_arms(curve):
    """arm -> {"recipe", "generator", "real_fraction", "synthetic_ratio", "seed"}: the arms of the
    value-of-synthetic-data curve. At the whole real pool, synthetic cases at each ratio of the real
    count; at each real fraction, real only and with ``fraction_synthetic`` x the pool's real count
    synthetic; each per generator (real-only arms once) and per nnU-Net seed, drawn from the
    curve's ``sample_set`` when it names one. Points the two curves share are one arm."""
    curve = value_curve_config(curve)
    points = [(1.0, float(r)) for r in curve["ratios"]]
    for f in curve["real_fractions"]:
        points += [(float(f), 0.0), (float(f), float(curve["fraction_synthetic"]))]
    arms = {}
    for f, s in dict.fromkeys(points):
        for gen in ([REAL] if s == 0 else curve["generators"]):
            for seed in curve["seeds"]:
                name = f"VC_R{_pct(f)}_S{_pct(s)}" + ("" if gen == REAL else f"_{gen}") + f"_seed{seed}"
                recipe = {"real": f, "synthetic": s, "relative_to": "real", "nnunet_seed": int(seed)}
                if gen != REAL:
                    recipe["generator"] = gen
                    if curve.get("sample_set"):
                        recipe["sample_set"] = curve["sample_set"]
                arms[name] = {"recipe": recipe, "generator": gen, "real_fraction": f, "synthetic_ratio": s,
                              "seed": int(seed)}
    return arms


def value_curve_table(scores, curve_arms, task, test_set):
    """One row per curve point (generator, real_fraction, synthetic_ratio): Dice over the seeds."""
    per_arm = []
    for arm, info in curve_arms.items():
        per_subject, _ = _subject_dice(scores, task, arm, test_set)
        per_arm.append({"generator": info["generator"], "real_fraction": info["real_fraction"],
                        "synthetic_ratio": info["synthetic_ratio"], "seed": info["seed"],
                        "n_test": int(per_subject.size), "dice": float(per_subject.mean())})
    per_arm = pd.DataFrame(per_arm)
    rows = []
    for (gen, f, s), grp in per_arm.groupby(["generator", "real_fraction", "synthetic_ratio"], sort=True):
        d = grp["dice"]
        rows.append({"task": task, "test_set": test_set, "generator": gen, "real_fraction": f,
                     "synthetic_ratio": s, "n_seeds": int(d.size), "n_test": int(grp["n_test"].iloc[0]),
                     "dice_mean": float(d.mean()), "dice_seed_std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                     "dice_seed_min": float(d.min()), "dice_seed_max": float(d.max())})
    return pd.DataFrame(rows)


def value_curve_figure(table, path):
    """Dice vs synthetic:real ratio at the whole real pool, and Dice vs real fraction, per generator
    (the real-only points shared); error bars: min-max over the nnU-Net seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    real = table[table["generator"] == REAL]
    gens = [g for g in table["generator"].unique() if g != REAL]

    def plot(ax, rows, x, label, style="-o"):
        rows = rows.sort_values(x)
        err = [rows["dice_mean"] - rows["dice_seed_min"], rows["dice_seed_max"] - rows["dice_mean"]]
        ax.errorbar(rows[x], rows["dice_mean"], yerr=err, fmt=style, capsize=3, label=label)

    full_real = real[real["real_fraction"] == 1.0]
    for g in gens:
        rows = table[(table["generator"] == g) & (table["real_fraction"] == 1.0)]
        plot(axes[0], pd.concat([full_real, rows]), "synthetic_ratio", g)
    axes[0].set(xlabel="synthetic : real cases (whole real pool)", ylabel="Dice (mean over classes)",
                title="more synthetic data")
    plot(axes[1], real, "real_fraction", "real only", "--ks")
    synthetic_at = table[(table["generator"] != REAL)]
    fixed = synthetic_at[synthetic_at["real_fraction"] < 1.0]["synthetic_ratio"]
    s = float(fixed.iloc[0]) if len(fixed) else 1.0
    for g in gens:
        plot(axes[1], table[(table["generator"] == g) & (table["synthetic_ratio"] == s)], "real_fraction",
             f"{g} (+{s:g}x synthetic)")
    axes[1].set(xscale="log", xlabel="share of the real pool", title="less real data")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Value of synthetic data: {table['task'].iloc[0]} on {table['test_set'].iloc[0]}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def write_value_curve(scores, curve_arms, task, test_set, paths):
    """The curve as csv / md / tex and the figure (``paths``: csv, md, tex, figure)."""
    table = value_curve_table(scores, curve_arms, task, test_set)
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    shown = table.drop(columns=["task", "test_set"]).round(
        {c: 3 for c in table.columns if c.startswith("dice")}).set_index("generator")
    title = f"Value of synthetic data: {task} on {test_set}"
    _write_text(paths["md"], _to_markdown(shown, VALUE_CURVE_FOOTNOTE, title=title))
    _write_text(paths["tex"], _to_latex(shown, VALUE_CURVE_FOOTNOTE, caption=title))
    value_curve_figure(table, paths["figure"])
    return table
