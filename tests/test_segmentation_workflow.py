"""The segmentation experiment stage: arm recipes, task label maps, the Snakemake rules.

Fast tests cover the experiment design (brainsynth.experiment) and the DAG (dry runs).
The slow test runs the real pipeline on a tiny demo cohort: preprocessing, then nnU-Net
(real nnU-Net v2, CPU, a few iterations) for one task and two real-data arms, scores,
tables, figures and the Snakemake report; then it checks by dry runs that changing one
arm's recipe reruns exactly that arm (dataset, planning, training, prediction, scoring)
and the task's tables, and that a training setting reruns training but not the datasets.
"""

import json
import re
import shutil
import zlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth import experiment as design
from brainsynth.errors import InputError
from brainsynth.labels import LabelSchema

from workflow_support import TINY_SEG, jobs_by_rule, planned_jobs, run_snakemake, seg_config

SCHEMA = LabelSchema()


# ----------------------------------------------------------------------------- design
def test_arm_counts_pool_and_real_relative():
    assert design.arm_counts({"real": 1.0}, 12, 20) == (12, 0)
    assert design.arm_counts({"real": 0.0, "synthetic": 1.0}, 12, 20) == (0, 20)
    assert design.arm_counts({"real": 1.0, "synthetic": 1.0}, 12, 20) == (12, 20)
    # R50S50: as many cases as R, half real, half synthetic
    assert design.arm_counts({"real": 0.5, "synthetic": 0.5, "relative_to": "real"}, 12, 20) == (6, 6)
    assert design.arm_counts({"real": 0.0, "synthetic": 1.0, "relative_to": "real"}, 12, 20) == (0, 12)
    assert design.arm_counts({"real": 0.5}, 3, 0) == (2, 0)  # half up
    with pytest.raises(InputError, match="synthesis.n_samples"):
        design.arm_counts({"synthetic": 2.0, "relative_to": "real"}, 12, 20, arm="X")
    with pytest.raises(InputError, match="no training case"):
        design.arm_counts({"real": 0.01}, 12, 20, arm="X")
    with pytest.raises(InputError, match="segmentation.recipes.X"):
        design.arm_counts({"real": 1.0, "fake": 1}, 12, 20, arm="X")
    # a mixture share that rounds to no case would be another arm under the mixture's name
    # (R5S95 of 9 real subjects: R0S100); 5% of 10 is half a case, rounded up
    with pytest.raises(InputError, match=r"real share of 0.05 of 9 real training subjects.*rounds to 0") as err:
        design.arm_counts({"real": 0.05, "synthetic": 0.95, "relative_to": "real"}, 9, 20, arm="R5S95")
    assert "segmentation.recipes.R5S95" in str(err.value) and "a pool of at least 10" in str(err.value)
    assert design.arm_counts({"real": 0.05, "synthetic": 0.95, "relative_to": "real"}, 10, 20) == (1, 10)
    with pytest.raises(InputError, match="synthetic share of 0.01 of 20 synthetic samples"):
        design.arm_counts({"real": 1.0, "synthetic": 0.01}, 12, 20, arm="X")
    with pytest.raises(InputError, match="synthetic pool"):
        design.arm_counts({"real": 1.0, "synthetic": 0.5}, 12, 0, arm="X")


def test_arm_cases_are_seeded_and_nested():
    real = [f"demo{i:03d}" for i in range(1, 13)]
    synth = design.synthetic_ids(20)
    assert synth[0] == "synth0001" and synth[-1] == "synth0020"
    full = design.arm_cases({"real": 1.0, "synthetic": 1.0}, real, synth, seed=7)
    assert full["real"] == sorted(real) and full["synthetic"] == sorted(synth)
    half = design.arm_cases({"real": 0.5, "synthetic": 0.5, "relative_to": "real"}, real, synth, seed=7)
    quarter = design.arm_cases({"real": 0.25}, real, synth, seed=7)
    assert len(half["real"]) == 6 and len(half["synthetic"]) == 6 and len(quarter["real"]) == 3
    assert set(quarter["real"]) <= set(half["real"])  # nested subsets
    assert half == design.arm_cases({"real": 0.5, "synthetic": 0.5, "relative_to": "real"}, real[::-1], synth,
                                    seed=7)  # independent of the input order
    other = design.arm_cases({"real": 0.5}, real, synth, seed=8)
    assert other["real"] != half["real"]
    with pytest.raises(InputError, match="both real and synthetic"):
        design.arm_cases({"real": 1.0, "synthetic": 1.0}, ["synth0001"], ["synth0001"], seed=1)


def test_task_label_maps_round_trip():
    tissue = {"classes": {"csf": ["csf"], "gm": ["gm"], "wm": ["wm", "wmh", "necrotic", "oedema", "enhancing"],
                          "deep_gm": ["deep_gm"], "brainstem": ["brainstem"]}}
    groups = design.task_classes(tissue, SCHEMA, "tissue")
    assert groups["wm"] == [3, 6, 7, 8, 9]
    assert design.nnunet_labels(groups) == {"background": 0, "csf": 1, "gm": 2, "wm": 3, "deep_gm": 4,
                                            "brainstem": 5}
    lut = design.forward_lut(groups, SCHEMA.n_classes)
    label = np.arange(10, dtype=np.uint8)
    assert design.apply_lut(label, lut).tolist() == [0, 1, 2, 3, 4, 5, 3, 3, 3, 3]
    assert design.inverse_lut(groups).tolist() == [0, 1, 2, 3, 4, 5]

    tumour = design.task_classes({"classes": {"tumour": ["necrotic", "oedema", "enhancing"]}}, SCHEMA)
    assert design.apply_lut(label, design.forward_lut(tumour, 10)).tolist() == [0] * 7 + [1] * 3
    assert design.inverse_lut(tumour).tolist() == [0, 7]
    wmh_def = {"classes": {"wmh": ["wmh"]}, "fp_tum": True}
    wmh = design.task_classes(wmh_def, SCHEMA)
    assert design.fp_tum_spec(wmh_def, wmh, SCHEMA) == {"wmh": [6], "tumour": [7, 8, 9]}
    assert design.fp_tum_spec({"classes": {}}, wmh, SCHEMA) is None
    with pytest.raises(InputError, match="unknown schema class"):
        design.task_classes({"classes": {"x": ["nonsense"]}}, SCHEMA, "bad")
    with pytest.raises(InputError, match="mapped to both"):
        design.task_classes({"classes": {"a": ["wm"], "b": ["wm"]}}, SCHEMA, "bad")
    with pytest.raises(InputError, match="outside"):
        design.apply_lut(np.array([12]), lut)


def test_check_foreground_names_the_arm():
    assert design.check_foreground({"a": {"csf": 3, "gm": 0}, "b": {"csf": 0, "gm": 0}}) == ["gm"]
    with pytest.raises(InputError, match="arm 'Rhalf'.*no voxel"):
        design.check_foreground({"a": {"wmh": 0}}, "wmh", "Rhalf")


def test_remap_label_file_keeps_geometry(tmp_path):
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    src = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(10, dtype=np.uint8).reshape(2, 5, 1), aff), src)
    lut = design.forward_lut({"tumour": [7, 8, 9]}, 10)
    out = design.remap_label_file(src, tmp_path / "out" / "case.nii.gz", lut)
    img = nib.load(out)
    assert np.allclose(img.affine, aff) and img.get_data_dtype() == np.uint8
    assert np.asarray(img.dataobj).ravel().tolist() == [0] * 7 + [1] * 3
    assert [p.name for p in out.parent.iterdir()] == ["case.nii.gz"]  # no temporary left


def test_test_sets_and_dataset_ids():
    subjects = pd.DataFrame({
        "subject": ["s4", "s1", "s2", "s3", "s5"], "site": ["c", "a", "a", "b", "a"],
        "split": ["test", "train", "test", "test", "test"],
        "role": ["far_ood", "in_distribution", "in_distribution", "near_ood", "in_distribution"]})
    assert design.test_sets(subjects) == {"in_distribution": ["s2", "s5"], "near_ood": ["s3"], "far_ood": ["s4"]}
    assert design.test_sets(subjects.drop(columns="role")) == {"a": ["s2", "s5"], "c": ["s4"], "b": ["s3"]}
    # the id follows the (task, arm) name, not list positions: adding an arm moves no other
    assert design.dataset_id("tissue", "R") == 100 + zlib.crc32(b"tissue/R") % 900
    ids = [design.dataset_id(t, a, base=500) for t in ("tissue", "wmh") for a in ("R", "S", "VC_R100_S200_gmm_seed1")]
    assert all(500 <= i <= 999 for i in ids) and len(set(ids)) > 1
    with pytest.raises(InputError, match="dataset_id_base"):
        design.dataset_id("tissue", "R", base=0)
    assert design.dataset_name("tumour", "R50S50") == "tumour-R50S50"


# ----------------------------------------------------------------------------- DAG
def test_dry_run_plans_every_segmentation_rule(tmp_path):
    code, out = run_snakemake(tmp_path, "-n", config=TINY_SEG)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    for rule in ("assemble_nnunet_dataset", "plan_nnunet", "train_segmentation", "score_segmentation"):
        assert jobs[rule] == 2, (rule, jobs)
    assert jobs["predict_segmentation"] == 6  # one job per arm and test set
    assert jobs["segmentation_table"] == 3  # dice, hd95, fp_tum
    assert jobs["experiment_table"] == 1
    by_rule = jobs_by_rule(out)
    assert by_rule["segmentation_table"] == ["task=wmh, metric=dice", "task=wmh, metric=fp_tum",
                                             "task=wmh, metric=hd95"]
    assert by_rule["train_segmentation"] == ["task=wmh, arm=R", "task=wmh, arm=Rhalf"]
    assert "results/tinyseg/segmentation/wmh/Rhalf/predictions/near_ood.tsv" in out
    assert "results/tinyseg/tables/tiny_e4/figure_e4.csv" in out
    assert not (tmp_path / "results").exists()


def test_synthetic_arms_follow_synthesis_switch(tmp_path):
    cfg = seg_config(arms=["R", "S", "H", "R50S50"])
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code == 0, out[-3000:]
    assert "arms ['S', 'H', 'R50S50'] (synthetic data) are left out" in out
    assert planned_jobs(out)["train_segmentation"] == 1

    # with synthesis on, the synthetic arms read results/<exp>/synthesis/samples/synthNNNN/*
    samples = tmp_path / "results" / "tinyseg" / "synthesis" / "samples"
    for sid in design.synthetic_ids(4):
        (samples / sid).mkdir(parents=True)
        for f in ("t1", "t2", "flair", "label"):
            (samples / sid / f"{f}.nii.gz").touch()
    cfg["synthesis"] = {"enabled": True, "n_samples": 4}
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code == 0, out[-3000:]
    assert planned_jobs(out)["train_segmentation"] == 4
    assemble = [b for b in re.split(r"\n(?=rule )", out) if b.startswith("rule assemble_nnunet_dataset")]
    inputs = {re.search(r"arm=(\w+)", b).group(1): re.search(r"input: (.*)", b).group(1) for b in assemble}
    assert "synthesis/samples/synth0004/label.nii.gz" in inputs["S"]
    # real cases come through the training split's table of preprocessed subjects (their files
    # are the job's params: brainsynth.experiment.arm_cases, tested above)
    assert "synth" not in inputs["R"] and "preprocessing/splits/train.tsv" in inputs["R"]
    assert "preprocessing/splits" not in inputs["S"]
    # R50S50 (relative to the 3 real training subjects): 2 real + 2 synthetic cases (half up)
    assert inputs["R50S50"].count("synthesis/samples") == 8 and "preprocessing/splits/train.tsv" in inputs["R50S50"]


def test_style_set_arm_reads_restyled_images_and_shared_labels(tmp_path):
    # domain shift: Hfar trains on the same synthetic labels as H, imaged in far-OOD styles
    # the default config's far-OOD set (far-ood: [far_ood]) and one more by site name
    cfg = seg_config(arms=["H", "Hfar"])
    cfg["synthesis"] = {"enabled": True, "n_samples": 2, "style_sets": {"b": ["site_b"]}}
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code == 0, out[-3000:]
    by_rule = jobs_by_rule(out)
    assert by_rule["restyle_synthetic"] == ["style_set=b", "style_set=far-ood"]  # every set is made
    blocks = [b for b in re.split(r"\n(?=rule )", out) if b.startswith("rule ")]
    assemble = {re.search(r"arm=(\w+)", b).group(1): re.search(r"input: (.*)", b).group(1)
                for b in blocks if b.startswith("rule assemble_nnunet_dataset")}
    assert "synthesis/samples/synth0002/label.nii.gz" in assemble["Hfar"]
    assert "synthesis/style_sets/far-ood/samples/synth0002/t1.nii.gz" in assemble["Hfar"]
    assert "synthesis/samples/synth0002/t1.nii.gz" not in assemble["Hfar"]
    assert "style_sets" not in assemble["H"]
    # the far-OOD set is styled by the far-OOD site's subject (site_c), the other by site_b's
    restyle = {re.search(r"style_set=([\w-]+)", b).group(1): re.search(r"input: (.*)", b).group(1)
               for b in blocks if b.startswith("rule restyle_synthetic")}
    # (which subjects: brainsynth.experiment.style_set_subjects, tested below; the job reads
    # their files through their split's table)
    assert "preprocessing/splits/test.tsv" in restyle["far-ood"] and "preprocessing/splits/test.tsv" in restyle["b"]
    assert "synthesis/samples/synth0001/labelprob.nii.gz" in restyle["far-ood"]


def test_style_set_subjects_match_site_roles_or_site_names():
    rows = {"s1": {"site": "site_a", "role": "in_distribution"}, "s2": {"site": "site_b", "role": "near_ood"},
            "s3": {"site": "site_c", "role": "far_ood"}, "s4": {"site": "site_c", "role": "far_ood"}}
    found = design.style_set_subjects(rows, {"far-ood": ["far_ood"], "b": ["site_b"], "both": ["site_a", "near_ood"],
                                             "none": ["mars"]})
    assert found == {"far-ood": ["s3", "s4"], "b": ["s2"], "both": ["s1", "s2"]}
    assert design.style_set_subjects({"s1": {"site": 3}}, {"x": [3]}) == {"x": ["s1"]}  # sites read as text


@pytest.mark.parametrize("style_sets,recipe,expect", [
    ({"far": ["far_ood"]}, {"real": 1.0, "synthetic": 1.0, "style_set": "nope"}, "style_set 'nope' is not defined"),
    ({"far": ["far_ood"]}, {"real": 1.0, "style_set": "far"}, "the arm uses no synthetic case"),
    ({"far": ["mars"]}, {"real": 1.0, "synthetic": 1.0, "style_set": "far"}, "no subject has a site or site role"),
])
def test_bad_style_set_is_named(tmp_path, style_sets, recipe, expect):
    cfg = seg_config(arms=["Hx"], recipes={"Hx": recipe})
    cfg["synthesis"] = {"enabled": True, "n_samples": 2, "style_sets": style_sets}
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code != 0
    assert expect in out, out[-2000:]
    assert "Traceback" not in out


def test_task_leaves_out_the_arms_it_excludes(tmp_path):
    # the demo leaves S out of the WMH task: its label generator makes no WMH at 4 mm
    cfg = seg_config(tasks=["tumour", "wmh"], task_definitions={"wmh": {"exclude_arms": ["Rhalf", "S"]}})
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code == 0, out[-3000:]
    by_rule = jobs_by_rule(out)
    for rule in ("assemble_nnunet_dataset", "plan_nnunet", "train_segmentation", "score_segmentation"):
        assert by_rule[rule] == ["task=tumour, arm=R", "task=tumour, arm=Rhalf", "task=wmh, arm=R"], rule
    assert len(by_rule["predict_segmentation"]) == 3 * 3
    tables = [b for b in re.split(r"\n(?=rule )", out) if b.startswith("rule segmentation_table")]
    wmh = [b for b in tables if "task=wmh" in b]
    assert wmh and all("wmh/R/scores.tsv" in b and "Rhalf" not in b for b in wmh)
    assert all("tumour/Rhalf/scores.tsv" in b for b in tables if "task=tumour" in b)


@pytest.mark.parametrize("change,expect", [
    ({"arms": ["R", "nope"]}, "['nope'] not defined"),
    ({"recipes": {"Rhalf": {"real": 0.5, "synthetic": 3.0}}, "arms": ["Rhalf"]}, "synthesis.n_samples"),
    ({"tasks": ["wmh", "bad"], "task_definitions": {"bad": {"classes": {"x": ["nonsense"]}}}},
     "unknown schema class 'nonsense'"),
    ({"task_definitions": {"wmh": {"exclude_arms": ["R", "nope"]}}},
     "task 'wmh' names arms ['nope'] that are not defined"),
    ({"recipes": {"Rhalf": {"n_real": 2, "modalities": ["flair"]}}},
     "1 modalities ['flair'] for a task with 3 input channels"),
    ({"experiment_definitions": {"tiny_e4": {"task": "wmh", "arms": ["R", "S"], "test_sets": ["near_ood"]}}},
     "segmentation.experiment_definitions.tiny_e4"),
    ({"recipes": {"Rhalf": {"real": 1.0, "sample_set": "unseen"}}}, "sample_set 'unseen' is not defined"),
    ({"recipes": {"Rhalf": {"synthetic": 1.0, "sample_set": "u", "style_set": "far-ood"}}},
     "use either style_set or sample_set"),
])
def test_bad_segmentation_config_is_named(tmp_path, change, expect):
    cfg = seg_config(**change)
    cfg["synthesis"] = {"enabled": True, "n_samples": 2, "sample_sets": {"u": {"conditioning": "unseen"}}}
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code != 0
    assert expect in out, out[-2000:]
    assert "Traceback" not in out


# a lesion type may hold "_" (the schema's names are free): the check names the valid modes
@pytest.mark.parametrize("where, mode", [("main", "glioma_only"), ("sample_set", "low_grade_glioma_only")])
def test_unknown_lesion_type_conditioning_is_named_before_any_work(tmp_path, where, mode):
    cfg = seg_config()
    cfg["synthesis"] = {"enabled": True, "n_samples": 2, "sample_sets": {"u": {"conditioning": "unseen"}}}
    if where == "main":
        cfg["synthesis"]["conditioning"] = mode
    else:
        cfg["synthesis"]["sample_sets"]["u"]["conditioning"] = mode
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    field = "synthesis.conditioning" if where == "main" else "synthesis.sample_sets.u.conditioning"
    assert code != 0 and field in out and "tumour_only" in out, out[-2000:]
    assert "Traceback" not in out and not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- real run
@pytest.mark.slow
def test_tiny_segmentation_runs_and_recipe_change_reruns_only_that_arm(tiny_seg_run, tmp_path):
    # the session's one run of TINY_SEG (conftest.py), copied: a finished run moved to another
    # folder is up to date there
    shutil.copytree(tiny_seg_run, tmp_path, symlinks=True, dirs_exist_ok=True)
    code, out = run_snakemake(tmp_path, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]
    res = tmp_path / "results" / "tinyseg"
    seg_dir = res / "segmentation" / "wmh"

    ds = {a: json.loads((seg_dir / a / "dataset.json").read_text()) for a in ("R", "Rhalf")}
    assert (ds["R"]["n_real"], ds["Rhalf"]["n_real"]) == (3, 2)
    assert {c["case_id"] for c in ds["Rhalf"]["cases"]} < {c["case_id"] for c in ds["R"]["cases"]}
    assert ds["R"]["labels"] == {"background": 0, "wmh": 1}
    assert [ds[a]["dataset_id"] for a in ("R", "Rhalf")] == [design.dataset_id("wmh", a) for a in ("R", "Rhalf")]
    raw = seg_dir / "R" / "nnunet" / "raw" / ds["R"]["dataset_name"]
    for case in ds["R"]["cases"]:
        lab = raw / "labelsTr" / f"{case['case_id']}.nii.gz"
        assert lab.is_symlink() and lab.resolve() == (seg_dir / "R" / "labels" / lab.name).resolve()
        assert set(np.unique(np.asarray(nib.load(lab).dataobj))) <= {0, 1}
        assert (raw / "imagesTr" / f"{case['case_id']}_0002.nii.gz").resolve().name == "flair.nii.gz"
    # Rhalf feeds its own modalities to the channels (recipe key modalities)
    raw_half = seg_dir / "Rhalf" / "nnunet" / "raw" / ds["Rhalf"]["dataset_name"]
    case = ds["Rhalf"]["cases"][0]["case_id"]
    assert [(raw_half / "imagesTr" / f"{case}_{k:04d}.nii.gz").resolve().name for k in range(3)] == [
        "t2.nii.gz", "t1.nii.gz", "flair.nii.gz"]
    assert json.loads((raw_half / "dataset.json").read_text())["channel_names"] == {"0": "t2", "1": "t1", "2": "flair"}
    model = json.loads((seg_dir / "R" / "model.json").read_text())
    assert (tmp_path / model["checkpoint"]).is_file() and model["epochs"] == 2
    assert "nnunet/results" in model["model_folder"]

    pred = seg_dir / "R" / "predictions"
    test_sets = {p.name: sorted(q.name for q in p.glob("*.nii.gz")) for p in pred.iterdir() if p.is_dir()}
    assert sorted(test_sets) == ["far_ood", "in_distribution", "near_ood"]
    assert [len(v) for v in test_sets.values()] == [1, 1, 1]
    some = next((pred / "near_ood").glob("*.nii.gz"))
    truth = res / "preprocessing" / "subjects" / some.name.replace(".nii.gz", "") / "grid" / "label.nii.gz"
    assert nib.load(some).shape == nib.load(truth).shape
    assert np.allclose(nib.load(some).affine, nib.load(truth).affine, atol=1e-4)

    scores = pd.read_csv(seg_dir / "Rhalf" / "scores.tsv", sep="\t")
    assert set(scores["test_set"]) == {"in_distribution", "near_ood", "far_ood"}
    assert set(scores["arm"]) == {"Rhalf"} and set(scores["task"]) == {"wmh"}
    assert {"dice", "hd95", "fp_tum", "truth_voxels"} <= set(scores["metric"])
    assert scores.loc[scores["metric"] == "dice", "value"].between(0, 1).all()

    for metric in ("dice", "hd95", "fp_tum"):
        table = pd.read_csv(res / "tables" / f"wmh_{metric}.csv")
        assert table["arm"].tolist() == ["R", "Rhalf"]
        assert any("(far_ood)" in c for c in table.columns)
        for ext in ("md", "tex"):
            assert (res / "tables" / f"wmh_{metric}.{ext}").stat().st_size > 50
        assert (res / "figures" / f"wmh_{metric}.png").stat().st_size > 5000

    # the study's layout: Dice and recall on one test set, FP_tum on another, every pair tested
    e4 = pd.read_csv(res / "tables" / "tiny_e4" / "figure_e4.csv")
    assert e4["arm"].tolist() == ["R", "Rhalf"]
    assert list(e4.columns[1:]) == ["in_distribution wmh dice", "in_distribution wmh recall",
                                    "near_ood tumour fp_tum"]
    assert "HD95: larger of the two directed" in (res / "tables" / "tiny_e4" / "figure_e4.md").read_text()
    assert (res / "figures" / "tiny_e4" / "figure_e4.png").stat().st_size > 5000
    design_table = pd.read_csv(res / "segmentation" / "design.tsv", sep="\t", keep_default_na=False)
    assert design_table.set_index("arm").loc["Rhalf", "test_sets"] == (
        "in_distribution:t1+t2+flair near_ood:t1+t2+flair far_ood:flair+flair+flair")

    code, out = run_snakemake(tmp_path, "--report", "report.html", config=TINY_SEG)
    assert code == 0, out[-3000:]
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "wmh_dice.csv" in html and "wmh_fp_tum.png" in html

    code, out = run_snakemake(tmp_path, "-n", config=TINY_SEG)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # one arm's recipe changes: that arm's chain and the task's tables rerun, nothing else (the
    # design is checked against the label maps at parse time)
    changed = seg_config(recipes={"Rhalf": {"real": 1.0}})
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out[-3000:]
    per_arm = {"assemble_nnunet_dataset", "plan_nnunet", "train_segmentation", "score_segmentation"}
    assert planned_jobs(out) == {**{r: 1 for r in per_arm}, "predict_segmentation": 3, "segmentation_design": 1,
                                 "segmentation_table": 3, "experiment_table": 1, "all": 1}, out[-3000:]
    jobs = jobs_by_rule(out)
    for rule in per_arm:
        assert jobs[rule] == ["task=wmh, arm=Rhalf"], jobs
    assert all(j.startswith("task=wmh, arm=Rhalf, test_set=") for j in jobs["predict_segmentation"])

    # an arm's nnU-Net seed (a replicate): that arm retrains on its dataset and plans as they are
    changed = seg_config(recipes={"Rhalf": {**TINY_SEG["segmentation"]["recipes"]["Rhalf"], "nnunet_seed": 5}})
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out[-3000:]
    assert planned_jobs(out) == {"train_segmentation": 1, "predict_segmentation": 3, "score_segmentation": 1,
                                 "segmentation_design": 1, "segmentation_table": 3, "experiment_table": 1,
                                 "all": 1}, out[-3000:]
    assert jobs_by_rule(out)["train_segmentation"] == ["task=wmh, arm=Rhalf"]

    # a training setting: every arm retrains (and predicts, scores), no dataset or plan reruns
    changed = seg_config(nnunet=dict(TINY_SEG["segmentation"]["nnunet"], iterations_per_epoch=5))
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out[-3000:]
    assert planned_jobs(out) == {"train_segmentation": 2, "predict_segmentation": 6, "score_segmentation": 2,
                                 "segmentation_table": 3, "experiment_table": 1, "all": 1}
    # the task's own training length overrides the shared one
    changed = seg_config(task_definitions={"wmh": {"nnunet": {"epochs": 3}}})
    code, out = run_snakemake(tmp_path, "-n", config=changed)
    assert code == 0, out[-3000:]
    assert planned_jobs(out)["train_segmentation"] == 2
