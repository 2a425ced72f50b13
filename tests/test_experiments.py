"""The study's four experiments: arm pools, channels, test sets, the study's table marks, and
the demo config that encodes E1-E4 (planned by dry run and by the segmentation_design rule,
which needs no image work)."""

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from brainsynth import experiment as design
from brainsynth import study_tables
from brainsynth.errors import InputError
from brainsynth.metrics import hd95

from workflow_support import REPO, job_blocks, planned_jobs, run_snakemake

ROWS = {
    "a1": {"split": "train", "site": "A", "role": "in_distribution", "phenotype": "wmh"},
    "a2": {"split": "train", "site": "A", "role": "in_distribution", "phenotype": "tumour"},
    "a3": {"split": "test", "site": "A", "role": "in_distribution", "phenotype": "wmh"},
    "b1": {"split": "train", "site": "B", "role": "near_ood", "phenotype": "healthy"},
    "b2": {"split": "test", "site": "B", "role": "near_ood", "phenotype": "both"},
}


# ----------------------------------------------------------------------------- design units
def test_select_subjects_by_role_site_phenotype():
    assert design.select_subjects(ROWS, None, "train", "f") == ["a1", "a2", "b1"]
    assert design.select_subjects(ROWS, {"roles": ["in_distribution"]}, "train", "f") == ["a1", "a2"]
    assert design.select_subjects(ROWS, {"sites": ["B"]}, "test", "f") == ["b2"]
    assert design.select_subjects(ROWS, {"roles": ["in_distribution"], "phenotypes": ["wmh", "both"]},
                                  "test", "f") == ["a3"]
    with pytest.raises(InputError, match="unknown selector keys"):
        design.select_subjects(ROWS, {"role": ["x"]}, "train", "segmentation.real_pool")
    no_phenotype = {s: {k: v for k, v in r.items() if k != "phenotype"} for s, r in ROWS.items()}
    with pytest.raises(InputError, match="no subject has a 'phenotype'.*") as err:
        design.select_subjects(no_phenotype, {"phenotypes": ["wmh"]}, "train", "segmentation.recipes.R.real_pool")
    assert "segmentation.recipes.R.real_pool.phenotypes" in str(err.value)


def test_n_real_is_an_absolute_count():
    assert design.arm_counts({"n_real": 5}, 12, 20) == (5, 0)
    assert design.arm_counts({"n_real": 5, "synthetic": 1.0}, 12, 20) == (5, 20)
    with pytest.raises(InputError, match="both a real fraction and n_real"):
        design.arm_counts({"n_real": 5, "real": 0.5}, 12, 20, arm="R_les")
    with pytest.raises(InputError, match="asks for 5 real cases but its real pool holds 3"):
        design.arm_counts({"n_real": 5}, 3, 20, arm="R_les")


def test_channels_and_test_modalities():
    mods = ["t1", "t2", "flair"]
    assert design.task_inputs({}, mods, ["id", "far"]) == (mods, {"id": mods, "far": mods})
    channels, per_set = design.task_inputs({"modalities": ["t1"], "test_modalities": {"far": ["flair"]}},
                                           mods, ["id", "far"])
    assert channels == ["t1"] and per_set == {"id": ["t1"], "far": ["flair"]}
    assert design.task_inputs({"test_sets": ["far"]}, mods, ["id", "far"])[1] == {"far": mods}
    with pytest.raises(InputError, match="do not exist"):
        design.task_inputs({"test_sets": ["mars"]}, mods, ["id"], "tissue")
    with pytest.raises(InputError, match="do not fill"):
        design.task_inputs({"modalities": ["t1"], "test_modalities": {"id": ["t1", "t2"]}}, mods, ["id"])
    assert design.arm_modalities({"modalities": ["flair"]}, ["t1"], mods) == ["flair"]
    assert design.arm_modalities({}, ["t1", "flair"], mods) == ["t1", "flair"]
    with pytest.raises(InputError, match="1 modalities .* for a task with 2 input channels"):
        design.arm_modalities({"modalities": ["flair"]}, ["t1", "flair"], mods, "S_fOD")
    with pytest.raises(InputError, match="not among the run's modalities"):
        design.arm_modalities({"modalities": ["t1ce"]}, ["t1"], mods)


def test_defined_test_sets_keep_order_and_refuse_empty_sets():
    sets = design.defined_test_sets(ROWS, {"wmh": {"phenotypes": ["wmh"]}, "ood": {"roles": ["near_ood"]}})
    assert sets == {"wmh": ["a3"], "ood": ["b2"]}
    with pytest.raises(InputError, match="selects no test subject"):
        design.defined_test_sets(ROWS, {"tumour": {"phenotypes": ["tumour"]}})


# ----------------------------------------------------------------------------- study tables
def _long(values, metric="dice", test_set="id", cls="wm"):
    """Long score rows from {arm: [value per subject]} (subjects s0, s1, ... shared by the arms)."""
    return pd.DataFrame([{"arm": a, "subject": f"s{i}", "class": cls, "metric": metric, "test_set": test_set,
                          "value": v} for a, vs in values.items() for i, v in enumerate(vs)])


def test_better_of_a_pair_is_marked_whichever_it_is():
    good = list(np.linspace(0.80, 0.90, 10))
    bad = [v - 0.2 for v in good]
    table, pvalues, note = study_tables.experiment_table(_long({"R_id": good, "S_id": bad}), ["R_id", "S_id"],
                                                         ["id"], ["dice"], reference_arm="R_id")
    assert table.loc["R_id", "wm"].endswith("*") and not table.loc["S_id", "wm"].endswith("*")
    assert table.loc["R_id", "wm"].startswith("0.850 (")
    # Wilcoxon, paired by subject: 10 pairs all one way -> p = 2 / 2**10
    assert pvalues["test"].tolist() == ["wilcoxon"] and pvalues["p"].iloc[0] == pytest.approx(2 / 1024)
    table, _, _ = study_tables.experiment_table(_long({"R_id": bad, "S_id": good}), ["R_id", "S_id"], ["id"],
                                                ["dice"], reference_arm="R_id")
    assert table.loc["S_id", "wm"].endswith("*") and not table.loc["R_id", "wm"].endswith("*")
    assert "Wilcoxon" in note


def test_double_mark_excludes_upper_bound_arms_and_lower_is_better_for_fp_tum():
    base = np.linspace(0.5, 0.6, 10)
    values = {"R_id": list(base), "S_id": list(base + 0.1),
              "S_fOD": list(base + 0.3), "R_fOD": list(base + 0.45)}
    table, _, _ = study_tables.experiment_table(_long(values), list(values), ["id"], ["dice"],
                                                reference_arm="R_id", upper_bound_arms=["R_fOD"])
    assert table.loc["S_fOD", "wm"].endswith("**")          # beats R_id and S_id (R_fOD excepted)
    assert table.loc["S_id", "wm"].endswith("*") and not table.loc["S_id", "wm"].endswith("**")
    # an upper bound is better than the reference (*), never marked **
    assert table.loc["R_fOD", "wm"].endswith("*") and not table.loc["R_fOD", "wm"].endswith("**")
    fp = _long({"R100S0": [0.30] * 5 + [0.31] * 5, "R0S100": list(np.linspace(0.01, 0.02, 10))},
               metric="fp_tum", test_set="tumour", cls="fp_tum")
    table, _, note = study_tables.experiment_table(fp, ["R100S0", "R0S100"], ["tumour"], ["fp_tum"],
                                                   reference_arm="R100S0")
    assert table.loc["R0S100", "fp_tum"].startswith("1.500 (") and table.loc["R0S100", "fp_tum"].endswith("*")
    assert "in %" in note


def test_columns_per_test_set_and_metric_map(tmp_path):
    df = pd.concat([_long({"A": [0.5, 0.6], "B": [0.4, 0.5]}, test_set="wmh", cls="wmh"),
                    _long({"A": [0.1, 0.2], "B": [0.0, 0.1]}, metric="fp_tum", test_set="tumour", cls="fp_tum"),
                    _long({"A": [0.9, 0.9], "B": [0.9, 0.9]}, metric="recall", test_set="wmh", cls="wmh")])
    metrics = {"wmh": ["dice", "recall"], "tumour": ["fp_tum"]}
    cols = study_tables.experiment_columns(df, ["wmh", "tumour"], metrics)
    assert cols == [("wmh", "wmh", "dice"), ("wmh", "wmh", "recall"), ("tumour", "fp_tum", "fp_tum")]
    paths = {k: tmp_path / f"t.{k}" for k in ("csv", "md", "tex")} | {"pvalues": tmp_path / "p.csv"}
    table, pvalues = study_tables.write_experiment(df, paths, ["A", "B"], ["wmh", "tumour"], metrics, "E4",
                                                   metric_definitions="HD95: x.")
    assert list(table.columns) == ["wmh wmh dice", "wmh wmh recall", "tumour fp_tum fp_tum"]
    assert "HD95: x." in paths["md"].read_text() and r"\begin{tabular}" in paths["tex"].read_text()
    assert len(pd.read_csv(paths["pvalues"])) == 3
    fig = study_tables.experiment_figure(df, tmp_path / "f.png", ["A", "B"], ["wmh", "tumour"], metrics, "E4",
                                         pvalues=pvalues)
    assert fig.stat().st_size > 5000


def test_check_experiment_names_the_field():
    arms, sets = {"wmh": ["R", "S"]}, {"wmh": {"wmh": ["flair"], "tumour": ["flair"]}}
    good = {"task": "wmh", "arms": ["R", "S"], "test_sets": ["wmh"], "metrics": {"wmh": ["dice"]}}
    study_tables.check_experiment("e4", good, arms, sets, {"dice", "fp_tum"})
    for change, expect in [({"task": "tissue"}, "task 'tissue' is not run"),
                           ({"arms": ["R", "H"]}, r"arms \['H'\] are not arms the task"),
                           ({"test_sets": ["far"]}, "test sets .'far'. are not scored"),
                           ({"metrics": ["hd95"]}, "not metrics scored"),
                           ({"metrics": {"far": ["dice"]}}, "not metrics scored"),
                           ({"upper_bound_arms": ["X"]}, "not arms of the experiment"),
                           ({"layout": "poster"}, "layout 'poster'")]:
        with pytest.raises(InputError, match=expect) as err:
            study_tables.check_experiment("e4", {**good, **change}, arms, sets, {"dice", "fp_tum"})
        assert "segmentation.experiment_definitions.e4" in str(err.value)


def test_hd95_definitions_by_hand():
    # a: one voxel at 0; b: voxels at 3 and 4 (every voxel is an edge voxel). Directed distances:
    # a->b [3], b->a [3, 4]. MONAI: max(q95([3]), q95([3, 4])) = 3.95; BraTS: q95([3, 3, 4]) = 3.9
    a = np.zeros((1, 8), bool)
    b = a.copy()
    a[0, 0] = True
    b[0, 3:5] = True
    assert hd95(a, b) == pytest.approx(3.95)
    assert hd95(a, b, definition="brats") == pytest.approx(3.9)
    assert hd95(a, b, spacing=[1.0, 2.0], definition="brats") == pytest.approx(7.8)
    with pytest.raises(InputError, match="hd95_definition"):
        hd95(a, b, definition="medpy")


# ----------------------------------------------------------------------------- the four experiments
CONFIG = REPO / "config" / "experiments" / "brainspade_demo.yaml"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The brainSPADE demo config planned: the design table (segmentation_design rule) and a dry run."""
    work = tmp_path_factory.mktemp("brainspade")
    cfg = yaml.safe_load(CONFIG.read_text())
    run_snakemake(work, "results/brainspade-demo/segmentation/design.tsv", config=cfg, check=True, timeout=300)
    table = pd.read_csv(work / "results" / "brainspade-demo" / "segmentation" / "design.tsv", sep="\t",
                        dtype=str, keep_default_na=False).set_index("arm")
    code, out = run_snakemake(work, "-n", config=cfg, timeout=300)
    assert code == 0, out[-3000:]
    return cfg, table, out


def _cases(table, arm, pool):
    return table.loc[arm, f"{pool}_cases"].split()


def test_each_experiment_plans_the_study_protocol(planned):
    from brainsynth.demo import plan_cohort

    cfg, table, out = planned
    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["demo"]
    # subjects are numbered in site order: Snakemake keeps the --configfile's, whose YAML dump
    # (run_snakemake) sorts the keys
    merged["sites"] = dict(sorted(cfg["demo"]["sites"].items()))
    cohort = plan_cohort(merged, 20261125).set_index("subject")
    sites = cohort.groupby("site")

    def rows(subjects):
        return cohort.loc[subjects]

    # E1 / E2: tissue from T1; S_fOD and R_fOD learn it from FLAIR; far-OOD tested on FLAIR
    tissue = table[table["task"] == "tissue3"]
    assert list(tissue.index) == ["R_id", "S_id", "S_nOD", "S_fOD", "R_nOD", "R_fOD"]
    assert dict(tissue["modalities"]) == {"R_id": "t1", "S_id": "t1", "S_nOD": "t1", "S_fOD": "flair",
                                          "R_nOD": "t1", "R_fOD": "flair"}
    assert set(tissue["test_sets"]) == {"in_distribution:t1 near_ood:t1 far_ood:flair"}
    r_id = rows(_cases(table, "R_id", "real"))
    assert set(r_id["role"]) == {"in_distribution"} and set(r_id["split"]) == {"train"} and len(r_id) == 28
    assert len(_cases(table, "S_id", "synthetic")) == len(r_id)          # as many synthetic as real
    assert table.loc["S_nOD", "style_set"] == "near-ood" and table.loc["S_fOD", "style_set"] == "far-ood"
    for arm, role in (("R_nOD", "near_ood"), ("R_fOD", "far_ood")):
        real = rows(_cases(table, arm, "real"))
        assert set(real["role"]) == {role} and set(real["split"]) == {"train"} and len(real) == 4
    # E3: 5 real tumour subjects, synthetic cases, both; T1 + FLAIR; held-out tumour subjects
    assert len(_cases(table, "R_les", "real")) == 5
    assert set(rows(_cases(table, "R_les", "real"))["phenotype"]) <= {"tumour", "both"}
    assert _cases(table, "H_les", "real") == _cases(table, "R_les", "real")
    assert _cases(table, "S_les", "synthetic") == _cases(table, "H_les", "synthetic") != []
    assert set(table.loc[["S_les", "H_les"], "sample_set"]) == {"tumour"}   # tumour cases only
    assert set(table.loc[["R_les", "S_les", "H_les"], "modalities"]) == {"t1 flair"}
    assert set(table.loc[["R_les", "S_les", "H_les"], "test_sets"]) == {"tumour:t1+flair"}
    # E4: WMH on FLAIR; real WMH-only subjects vs the unseen (WMH + tumour) sample set, mixtures
    r100 = rows(_cases(table, "R100S0", "real"))
    assert set(r100["phenotype"]) == {"wmh"} and set(r100["role"]) == {"in_distribution"}
    n = len(r100)
    # the study's R5S95 rounds to no real subject at demo scale (9): not an arm of the demo
    assert n < 10 and "R5S95" not in set(table.index)
    for arm, real, synth in (("R0S100", 0, n), ("R10S90", int(0.1 * n + 0.5), int(0.9 * n + 0.5)),
                             ("R50S50", int(0.5 * n + 0.5), int(0.5 * n + 0.5))):
        assert (len(_cases(table, arm, "real")), len(_cases(table, arm, "synthetic"))) == (real, synth), arm
        assert table.loc[arm, "sample_set"] == "unseen"
        assert set(_cases(table, arm, "real")) <= set(r100.index)
    assert set(table.loc[table["task"] == "wmh", "test_sets"]) == {"wmh:flair tumour:flair"}
    # at least 10 test subjects per test set, and each set holds what its name says
    jobs = planned_jobs(out)
    assert jobs["experiment_table"] == 4 and jobs["train_segmentation"] == 13
    assert jobs["predict_segmentation"] == 6 * 3 + 3 + 4 * 2
    assert jobs["sample_synthetic_unseen"] == 1
    # the near-OOD dataset has T1 only, the far-OOD one FLAIR only: their style sets image what
    # they have, and their subjects are made with those modalities alone
    assert jobs["restyle_synthetic_t1"] == 1 and jobs["restyle_synthetic_flair"] == 1
    assert (jobs["synthesize_subject_t1"], jobs["synthesize_subject_flair"]) == (14, 14)
    assert jobs["synthesize_subject"] == len(cohort) - 28
    for name in ("table_1_2", "table_1_3", "figure_1_4", "figure_1_6"):
        assert f"/{name}.csv" in out and f"/{name}.png" in out
    # datasets as in the study: healthy + WMH with skull (site_a), BraTS-like tumours delivered
    # skull-stripped (site_t), no training subject with both lesion types (E4's unseen phenotype)
    assert set(sites.get_group("site_a")["phenotype"]) == {"healthy", "wmh"}
    assert set(sites.get_group("site_t")["phenotype"]) == {"tumour"}
    assert cfg["demo"]["sites"]["site_t"]["skull_stripped"] and cfg["preprocessing"]["skull_stripped"] == ["site_t"]
    assert not (cohort["role"].eq("in_distribution") & cohort["phenotype"].eq("both")).any()
    assert set(rows(_cases(table, "R_les", "real"))["site"]) == {"site_t"}
    test = cohort[cohort["split"] == "test"]
    for phenotypes, name in (({"tumour", "both"}, "tumour"), ({"wmh"}, "wmh")):
        assert (test["role"].eq("in_distribution") & test["phenotype"].isin(phenotypes)).sum() >= 10, name
    assert test["role"].value_counts().min() >= 10


def _threads_and_priority(out, rules):
    """rule -> the set of (threads, priority) its planned jobs carry."""
    found = {}
    for rule, threads, priority in job_blocks(out):
        if rule in rules:
            found.setdefault(rule, set()).add((threads, priority))
    return found


GENERATOR_JOBS = ["train_label_vae", "calibrate_label_vae", "train_label_ldm", "fit_label_sampling", "fit_compose_weight",
                  "sample_synthetic",
                  "sample_synthetic_unseen",
                  "label_generator_fidelity", "train_image_generator", "restyle_synthetic_t1",
                  "restyle_synthetic_flair", "plan_nnunet"]


def test_generator_jobs_threads_and_priority(planned, tmp_path):
    """The demo's critical path: the 3D label networks on 2 threads and first in line (priority),
    the slice-wise image generator and nnU-Net planning on 1; num_threads moves them."""
    cfg, _, out = planned
    label = {(2, 10)}
    expected = {"train_label_vae": label, "calibrate_label_vae": label, "train_label_ldm": label,
                "fit_label_sampling": label, "fit_compose_weight": label, "sample_synthetic": label,
                "sample_synthetic_unseen": label, "label_generator_fidelity": label,
                "train_image_generator": {(1, 0)},
                "restyle_synthetic_t1": {(1, 0)}, "restyle_synthetic_flair": {(1, 0)}, "plan_nnunet": {(1, 0)}}
    assert _threads_and_priority(out, GENERATOR_JOBS) == expected

    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg.setdefault("label_generator", {})["num_threads"] = 1
    cfg.setdefault("image_generator", {})["num_threads"] = 2
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code == 0, out[-3000:]
    found = _threads_and_priority(out, GENERATOR_JOBS)
    assert found["train_label_vae"] == found["sample_synthetic"] == {(1, 10)}
    assert found["train_image_generator"] == found["restyle_synthetic_flair"] == {(2, 0)}


def test_generator_pool_without_subjects_is_named(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["synthesis"]["training_pool"] = {"roles": ["far_od"]}
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code != 0 and "synthesis.training_pool" in out and "no training subject with a label" in out, out[-2000:]
    assert "Traceback" not in out


def test_mixture_whose_real_share_rounds_to_no_case_is_named_before_any_work(tmp_path):
    """The study's R5S95 over the demo's 9 real WMH subjects: 5% rounds to no real case, so the arm
    would train on R0S100's cases under another name; refused at parse time, naming the arm."""
    cfg = yaml.safe_load(CONFIG.read_text())
    seg = cfg["segmentation"]
    seg["recipes"]["R5S95"] = {**seg["recipes"]["R0S100"], "real": 0.05, "synthetic": 0.95}
    seg["arms"].append("R5S95")
    seg["task_definitions"]["wmh"]["arms"].append("R5S95")
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code != 0 and "Traceback" not in out, out[-2000:]
    for w in ("segmentation.recipes.R5S95", "real share of 0.05 of 9 real training subjects", "a pool of at least 10"):
        assert w in out, (w, out[-2000:])
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("change,words", [
    # R_nOD fed FLAIR, but the near-OOD dataset has T1 only
    (lambda c: c["segmentation"]["recipes"]["R_nOD"].update(modalities=["flair"]),
     ["arm R_nOD of task tissue3 needs ['flair']", "segmentation.recipes.R_nOD", "site_modalities"]),
    # the far-OOD test set fed T1, which its subjects do not have
    (lambda c: c["segmentation"]["task_definitions"]["tissue3"]["test_modalities"].update(far_ood=["t1"]),
     ["test set far_ood of task tissue3 needs ['t1']", "test_modalities.far_ood"]),
    # S_nOD fed FLAIR from the T1-only near-OOD style set
    (lambda c: c["segmentation"]["recipes"]["S_nOD"].update(modalities=["flair"]),
     ["arm S_nOD of task tissue3 feeds ['flair']", "style set 'near-ood'", "images ['t1']"]),
    # the generators learn every modality: a pool with the T1-only dataset is refused
    (lambda c: c["synthesis"].update(training_pool={"roles": ["in_distribution", "near_ood"]}),
     ["synthesis.training_pool (the generators learn from) needs ['t1', 't2', 'flair']", "has no t2, flair"]),
])
def test_modalities_a_subject_lacks_are_named_before_any_work(tmp_path, change, words):
    cfg = yaml.safe_load(CONFIG.read_text())
    change(cfg)
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code != 0 and "Traceback" not in out, out[-2000:]
    for w in words:
        assert w in out, (w, out[-2000:])
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- paper scale
PAPER_COHORT = [  # site, role, phenotype, train, test (the study's Table 1.1 sizes)
    ("ukb", "in_distribution", "healthy", 530, 15), ("ukb", "in_distribution", "wmh", 100, 15),
    ("brats", "in_distribution", "tumour", 103, 30),
    ("nood", "near_ood", "healthy", 25, 5), ("food", "far_ood", "healthy", 25, 5),
]
# the OOD datasets deliver what the study had of them: T1 only (near), FLAIR only (far)
PAPER_SITE_MODALITIES = {"nood": ["t1"], "food": ["flair"]}
PAPER_JOBS = {  # config -> planned jobs of the segmentation stage and the sampling it needs
    "e1_tissue_2d": {"train_segmentation": 2, "predict_segmentation": 2, "experiment_table": 1},
    "e1_tissue_3d_2mm": {"train_segmentation": 2, "predict_segmentation": 2, "experiment_table": 1},
    "e1_tissue_3d_1mm": {"train_segmentation": 2, "predict_segmentation": 2, "experiment_table": 1},
    "e2_domain_shift": {"train_segmentation": 6, "predict_segmentation": 12, "experiment_table": 1,
                        "restyle_synthetic_t1": 1, "restyle_synthetic_flair": 1},
    "e3_fewshot_tumour": {"train_segmentation": 3, "predict_segmentation": 3, "experiment_table": 1},
    "e4_wmh_with_tumours": {"train_segmentation": 5, "predict_segmentation": 10, "experiment_table": 1,
                            "sample_synthetic_unseen": 1},
}


def _paper_sheet(root):
    import nibabel as nib
    import os

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src = {}
    for kind in ("t1", "t2", "flair", "label"):
        src[kind] = root / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8 if kind == "label" else np.float32), aff), src[kind])
    rows, i = [], 0
    for site, role, phenotype, n_train, n_test in PAPER_COHORT:
        for split, n in (("train", n_train), ("test", n_test)):
            for _ in range(n):
                i += 1
                subject = f"sub-{i:04d}"
                (root / subject).mkdir()
                files = {}
                for kind, path in src.items():
                    if kind != "label" and kind not in PAPER_SITE_MODALITIES.get(site, [kind]):
                        files[kind] = ""
                        continue
                    os.link(path, root / subject / path.name)
                    files[kind] = str(root / subject / path.name)
                rows.append({"subject": subject, "site": site, "role": role, "split": split,
                             "phenotype": phenotype, **files})
    sheet = root / "subjects.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet, len(rows)


@pytest.mark.parametrize("name", sorted(PAPER_JOBS))
def test_paper_scale_config_plans_the_study_cohort(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "paper_sheet"
    if not (root / "subjects.tsv").exists():
        root.mkdir(exist_ok=True)
        _paper_sheet(root)
    n_subjects = len(pd.read_csv(root / "subjects.tsv", sep="\t"))
    cfg = yaml.safe_load((REPO / "config" / "experiments" / "paper" / f"{name}.yaml").read_text())
    assert cfg["experiment"] == name and cfg["label_generator"]["preset"] == "paper"
    cfg["samples"] = str(root / "subjects.tsv")
    cfg["site_modalities"] = PAPER_SITE_MODALITIES
    work = tmp_path_factory.mktemp(name)
    code, out = run_snakemake(work, "-n", "--quiet", "rules", config=cfg, timeout=600)
    assert code == 0, out[-3000:]
    assert "label_generator, image_generator: preset paper, the settings of config/config.yaml left out" in out
    jobs = planned_jobs(out)
    assert jobs["preprocess_subject"] == n_subjects == 853
    assert "fit_compose_weight" not in jobs          # the demo's fitted compose weights: not the study's
    assert jobs["sample_synthetic"] == 1 and jobs["train_label_ldm"] == 1 and jobs["train_image_generator"] == 1
    assert {k: jobs.get(k, 0) for k in PAPER_JOBS[name]} == PAPER_JOBS[name], jobs


def test_paper_generators_take_the_study_settings_not_the_demo_budgets():
    """Snakemake merges a paper config into config/config.yaml key by key; the generator sections it
    sets to preset paper are taken from it alone, so PAPER's budgets hold, not the demo's."""
    from snakemake.utils import update_config

    from brainsynth.generators.brainspade import image_generator as IG
    from brainsynth.generators.brainspade import label_generator as LG
    from brainsynth.generators.common import paper_sections_from_run

    run = yaml.safe_load((REPO / "config" / "experiments" / "paper" / "e4_wmh_with_tumours.yaml").read_text())
    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(merged, run)
    assert LG.resolve_config(merged["label_generator"])["ldm"]["steps"] == 4000        # the demo's, merged in
    taken = paper_sections_from_run(run)
    assert list(taken) == ["label_generator", "image_generator"]                          # nothing else replaced
    cfg = {**merged, **taken}
    label, image = LG.resolve_config(cfg["label_generator"]), IG.resolve_config(cfg["image_generator"])
    for key in ("steps", "lr", "prediction_type", "channels", "latent_norm"):
        assert label["ldm"][key] == {**LG.DEFAULTS["ldm"], **LG.PAPER["ldm"]}[key], key
    assert label["vae"]["steps"] == LG.PAPER["vae"]["steps"] and label["calibration"] == LG.DEFAULTS["calibration"]
    assert label["sampling"]["inference_steps"] == run["label_generator"]["sampling"]["inference_steps"]
    assert image["steps"] == IG.PAPER["steps"]
    assert taken["label_generator"] == run["label_generator"]                              # the run's section alone
    demo = yaml.safe_load(CONFIG.read_text())
    assert paper_sections_from_run(demo) == {}                                               # no paper section: no change


def test_generator_benchmark_config_adds_its_arms_and_table(tmp_path):
    """make benchmark's config over the four experiments': the other generators' arms, their
    generators' rules and the benchmark table; a comparison naming a test set the task lacks stops
    before any work, naming the field."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load(CONFIG.read_text())
    update_config(cfg, yaml.safe_load((REPO / "config" / "experiments" / "generator_benchmark_demo.yaml").read_text()))
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["train_segmentation"] == 26 and jobs["generator_benchmark"] == 1
    assert jobs["synthesize_gmm"] == jobs["insert_lesions"] == jobs["train_spade_diffusion"] == 1
    assert jobs["generator_image_fid"] == 6  # three generators' images on the tissue and tumour encoders
    assert jobs["generator_quality"] == 4  # every generator's samples, brainspade's included
    block = next(b for b in out.split("\n\n") if "rule generator_benchmark:" in b)
    for task, arm in (("tissue3", "R_id"), ("tissue3", "S_id_li"), ("tissue3", "H_id_sd"), ("tumour", "H_les_gmm")):
        assert f"segmentation/{task}/{arm}/scores.tsv" in block
    for fid in ("synthesis/quality/image_fid_tissue3.tsv", "benchmark/quality/image_fid_tumour_lesion_insertion.tsv",
                "benchmark/quality/generator_quality_spade_diffusion.tsv"):
        assert fid in block
    cfg["generator_benchmark"]["comparisons"][0]["test_set"] = "wmh"
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code != 0 and "generator_benchmark.comparisons[0].test_set" in out and "Traceback" not in out, out[-2000:]


def test_make_benchmark_plans_the_table_and_the_curve(tmp_path):
    """make benchmark's configs (read from the Makefile) plan the benchmark table, the curve and
    every arm of both: the four experiments' 13, the benchmark's 13 and the curve's 54."""
    import re

    from snakemake.utils import update_config

    line = next(x for x in (REPO / "Makefile").read_text().splitlines() if x.startswith("BENCHMARK :="))
    extra = re.findall(r"config/experiments/\S+\.yaml", line)
    assert extra == ["config/experiments/generator_benchmark_demo.yaml", "config/experiments/value_curve_demo.yaml"]
    cfg = yaml.safe_load(CONFIG.read_text())
    for path in extra:
        update_config(cfg, yaml.safe_load((REPO / path).read_text()))
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=600)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["train_segmentation"] == 13 + 13 + 54
    assert jobs["generator_benchmark"] == jobs["value_curve"] == 1


def test_training_seed_defaults_to_the_run_seed_and_is_checked():
    assert design.training_seed({"real": 1.0}, 7) == 7
    assert design.training_seed({"real": 1.0, "nnunet_seed": 2}, 7) == 2
    assert design.arm_counts({"real": 1.0, "nnunet_seed": 2}, 10, 0) == (10, 0)
    with pytest.raises(InputError, match="segmentation.recipes.A.nnunet_seed"):
        design.training_seed({"nnunet_seed": -1}, 0, "A")


def test_value_curve_config_adds_its_arms_to_its_task(tmp_path):
    """config/experiments/value_curve_demo.yaml over the four experiments': 54 VC arms (27 points x 2
    seeds) run by the tissue task only, the seeds' replicates on the same cases, the curve rule reading
    every one of them; a curve naming a task or test set that does not run stops before any work."""
    from snakemake.utils import update_config

    cfg = yaml.safe_load(CONFIG.read_text())
    update_config(cfg, yaml.safe_load((REPO / "config" / "experiments" / "value_curve_demo.yaml").read_text()))
    run_snakemake(tmp_path, "results/brainspade-demo/segmentation/design.tsv", config=cfg, check=True, timeout=300)
    table = pd.read_csv(tmp_path / "results" / "brainspade-demo" / "segmentation" / "design.tsv", sep="\t",
                        dtype=str, keep_default_na=False)
    vc = table[table["arm"].str.startswith("VC_")].set_index("arm")
    assert len(vc) == 54 and set(vc["task"]) == {"tissue3"}
    n_pool = len(_cases(vc, "VC_R100_S000_seed0", "real"))
    assert n_pool == 28 and vc.loc["VC_R100_S000_seed1", "nnunet_seed"] == "1"
    assert len(_cases(vc, "VC_R005_S100_gmm_seed0", "real")) == 1          # 5% of 28, rounded
    assert len(_cases(vc, "VC_R005_S100_gmm_seed0", "synthetic")) == n_pool
    assert len(_cases(vc, "VC_R100_S400_spade_diffusion_seed1", "synthetic")) == 4 * n_pool
    assert vc.loc["VC_R100_S050_lesion_insertion_seed0", "sample_set"] == "curve"
    for pool in ("real", "synthetic"):
        assert _cases(vc, "VC_R025_S100_brainspade_seed0", pool) == _cases(vc, "VC_R025_S100_brainspade_seed1", pool)
    run_seed = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["seed"]
    assert table.loc[table["arm"] == "R_id", "nnunet_seed"].tolist() == [str(run_seed)]
    code, out = run_snakemake(tmp_path, "-n", config=cfg, timeout=300)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs["train_segmentation"] == 13 + 54 and jobs["value_curve"] == 1
    block = next(b for b in re.split(r"\n(?=rule |localrule )", out) if b.startswith("rule value_curve:"))
    assert block.split("output:")[0].count("segmentation/tissue3/VC_") == 54
    for key, value, field in (("task", "wmh_missing", "value_curve.task"),
                              ("test_set", "tumour", "value_curve.test_set")):
        bad = yaml.safe_load(yaml.safe_dump(cfg))
        bad["generator_benchmark"]["value_curve"][key] = value
        code, out = run_snakemake(tmp_path, "-n", config=bad, timeout=300)
        assert code != 0 and field in out and "Traceback" not in out, out[-2000:]
