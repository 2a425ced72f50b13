"""The generator stage through Snakemake: train both generators, sample, score; survive a kill.

One slow test runs the real DAG on a tiny demo cohort (preprocessing, label VAE, label LDM,
SPADE image generator, sampling, quality tables, far-OOD restyling), SIGKILLs the whole
Snakemake process group while train_label_vae is running (after its first checkpoint), and
reruns with --rerun-incomplete: the VAE must resume from its checkpoint, not restart. The
same run has one real-only nnU-Net arm, whose model then reads the synthetic images (label
consistency, image FID).
"""

import json
import os
import re
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainsynth.errors import InputError
import torch
from brainsynth.generators import common as C

from workflow_support import TINY_GEN, TINY_SEG, planned_jobs, run_snakemake, snakemake_command

EXP = TINY_GEN["experiment"]


def test_dry_run_plans_every_generator_rule(tmp_path):
    code, out = run_snakemake(tmp_path, "-n", config=TINY_GEN)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    for rule in ("train_label_vae", "calibrate_label_vae", "train_label_ldm",
                 "fit_compose_weight",  # config.yaml: compose_weight fit
                 "fit_label_sampling",  # config.yaml: tissue_offsets fit
                 "train_image_generator", "sample_synthetic",
                 "synthesis_quality", "restyle_synthetic",  # the default config's far-OOD style set
                 "label_generator_fidelity", "synthetic_sample_qc"):
        assert jobs.get(rule) == 1, (rule, jobs)


def test_compose_weight_fitted_only_when_asked_and_something_composes(tmp_path):
    cfg = json.loads(json.dumps(TINY_GEN))
    cfg["label_generator"]["sampling"]["compose_weight"] = 1.5
    for d in ("given", "off"):
        (tmp_path / d).mkdir()
    code, out = run_snakemake(tmp_path / "given", "-n", config=cfg)
    assert code == 0 and "sample_synthetic" in planned_jobs(out), out[-3000:]
    assert "fit_compose_weight" not in planned_jobs(out)
    cfg["label_generator"]["sampling"].update(compose_weight="fit", compose_lesion_types=False)  # nothing to fit
    code, out = run_snakemake(tmp_path / "off", "-n", config=cfg)
    assert code == 0 and "sample_synthetic" in planned_jobs(out), out[-3000:]
    assert "fit_compose_weight" not in planned_jobs(out)


def _job_inputs(out, rule):
    """The input files of ``rule``'s job in a dry run's output."""
    found = re.search(rf"(?:local)?rule {rule}:\n\s+input: ([^\n]*)", out)
    assert found, (rule, out[-3000:])
    return found.group(1).split(", ")


def test_sampling_fits_run_only_when_asked_and_are_read_by_every_sampler(tmp_path):
    """sampling.tissue_offsets or sampling.deformation fit: rule fit_label_sampling runs, and
    sampling, the compose-weight fit and the audit's samples decode with its
    calibration, the audit's reconstructions with the VAE's; both none: no fit, every one of them
    with the VAE's calibration."""
    gen = f"results/{EXP}/generators/label_generator"
    fitted, vae_cal = f"{gen}/label_sampling_calibration.json", f"{gen}/label_vae_calibration.json"
    cfg = json.loads(json.dumps(TINY_GEN))
    for offsets, deformation in (("fit", "none"), ("none", "fit"), ("none", "none")):
        cfg["label_generator"]["sampling"].update(tissue_offsets=offsets, deformation=deformation)
        run = tmp_path / f"{offsets}_{deformation}"
        run.mkdir()
        code, out = run_snakemake(run, "-n", config=cfg)
        assert code == 0, out[-3000:]
        asked = "fit" in (offsets, deformation)
        assert ("fit_label_sampling" in planned_jobs(out)) == asked
        used = fitted if asked else vae_cal
        for rule in ("sample_synthetic", "fit_compose_weight", "label_generator_fidelity"):
            inputs = _job_inputs(out, rule)
            assert used in inputs, (rule, inputs)
            assert (fitted in inputs) == asked, (rule, inputs)
        assert vae_cal in _job_inputs(out, "label_generator_fidelity")  # its reconstructions


def test_deformation_fit_refused_for_a_2d_label_generator():
    """Its fit compares sampled volumes with the training volumes: a 2-D generator is refused when
    the workflow starts, naming the setting."""
    from brainsynth.generators.brainspade.settings import check_settings, fits_sampling_calibration
    cfg = {"spatial_dims": 2, "sampling": {"deformation": "fit"}}
    with pytest.raises(InputError, match="needs a 3-D label generator") as err:
        check_settings(cfg, ["wmh", "tumour"])
    assert err.value.field == "label_generator.sampling.deformation"
    check_settings({**cfg, "spatial_dims": 3}, ["wmh", "tumour"])
    assert fits_sampling_calibration({"sampling": {"deformation": "fit"}})
    assert not fits_sampling_calibration({"sampling": {"tissue_offsets": "none"}})
    with pytest.raises(InputError, match="deformation must be one of"):
        fits_sampling_calibration({"sampling": {"deformation": "yes"}})


@pytest.mark.parametrize("section, key, value, named", [
    ("sampling", "compose_weight", {"wmh": 1.5, "wmhh": 2}, "['wmhh']"),
    ("ldm", "lesion_weight", {"wmh": 10, "tumor": 1}, "['tumor']"),
])
def test_label_generator_lesion_type_settings_refused_before_any_job(tmp_path, section, key, value, named):
    """A misspelt lesion type or a bad weight in the label generator settings stops the workflow
    when it starts (not when the LDM trains or samples, after the VAE's training)."""
    bad = json.loads(json.dumps(TINY_GEN))
    bad.setdefault("label_generator", {}).setdefault(section, {})[key] = value
    code, out = run_snakemake(tmp_path, "-n", config=bad)
    assert code != 0 and "Traceback" not in out, out[-3000:]
    assert f"label_generator.{section}.{key}" in out and named in out, out[-3000:]
    assert not (tmp_path / "results").exists()


# TINY_GEN + one real-only tissue arm: the synthetic images' label consistency and image FID
# need a real-data model. (A task name of its own: config.yaml's 'tissue' would merge its
# five classes into these three.) The far-OOD site delivers FLAIR only, as the study's far-OOD
# dataset: preprocessing anchors it on its FLAIR, its style set images FLAIR only, and the
# tissue model reads its FLAIR.
GEN_WITH_TISSUE_ARM = {**TINY_GEN, "site_modalities": {"site_c": ["flair"]}, "segmentation": {
    "tasks": ["tissue3"], "arms": ["R"], "experiments": [],
    "task_definitions": {"tissue3": {
        "classes": {"csf": ["csf"], "gm": ["gm", "deep_gm"],
                    "wm": ["wm", "brainstem", "wmh", "necrotic", "oedema", "enhancing"]},
        "modalities": ["t1"], "test_sets": ["in_distribution", "far_ood"], "test_modalities": {"far_ood": ["flair"]}}},
    "nnunet": TINY_SEG["segmentation"]["nnunet"]}}


@pytest.mark.slow
def test_generator_stage_runs_and_resumes_after_kill(tmp_path):
    cfg = GEN_WITH_TISSUE_ARM
    cmd, env = snakemake_command(tmp_path, config=cfg)
    gen = tmp_path / "results" / EXP / "generators" / "label_generator"
    ckpt = gen / "checkpoints" / "label_vae_last.pt"
    with open(tmp_path / "first_run.log", "w") as first_log:
        proc = subprocess.Popen(cmd, stdout=first_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 1200
        try:
            while not ckpt.exists():
                assert proc.poll() is None, (tmp_path / "first_run.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no VAE checkpoint within 20 min"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed_at = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    total = TINY_GEN["label_generator"]["vae"]["steps"]
    assert 0 < killed_at < total
    assert not (gen / "label_vae.pt").exists(), "the VAE finished before the kill: nothing was tested"

    code, out = run_snakemake(tmp_path, config=cfg)
    assert code != 0 and "--unlock" in out  # the killed Snakemake left its lock
    run_snakemake(tmp_path, "--unlock", config=cfg, check=True)
    # the killed job's outputs are marked incomplete: rerun, not trusted
    _, out = run_snakemake(tmp_path, "--rerun-incomplete", config=cfg, check=True, timeout=1500)
    assert ("no AMX units" in out) == (not C.cpu_bf16_fast()), out[:3000]  # the onstart notice

    log = (tmp_path / "logs" / EXP / "generators" / "train_label_vae.log").read_text()
    assert f"resuming label_vae from checkpoint step {killed_at}" in log, log[-2000:]
    losses = pd.read_csv(gen / "label_vae_losses.tsv", sep="\t")
    assert losses["step"].tolist() == list(range(1, total + 1))  # each step once, across both runs

    syn = tmp_path / "results" / EXP / "synthesis"
    manifest = pd.read_csv(syn / "manifest.tsv", sep="\t")
    n = TINY_GEN["synthesis"]["n_samples"]
    assert len(manifest) == n
    assert (manifest[["dc_wmh", "dc_tumour"]] > 0).all().all()  # 'unseen': both lesion types at once
    for sid in manifest["subject"]:
        for f in ("label", "labelprob", "t1", "t2", "flair"):
            assert (syn / "samples" / sid / f"{f}.nii.gz").stat().st_size > 0
    assert (syn / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    quality = pd.read_csv(syn / "quality" / "quality_metrics.tsv", sep="\t")
    assert len(quality) > 0
    memo = pd.read_csv(syn / "quality" / "memorisation.tsv", sep="\t")
    assert len(memo) == n
    intensities = pd.read_csv(syn / "quality" / "class_intensities.tsv", sep="\t")
    assert set(intensities["modality"]) == {"t1", "t2", "flair"}
    # the fidelity audit: reconstruction of training and held-out maps, adherence per mode
    fidelity = pd.read_csv(syn / "quality" / "label_fidelity.tsv", sep="\t")
    assert {"reconstruction", "adherence", "tissue", "diversity", "memorisation"} <= set(fidelity["group"])
    assert "healthy_any_lesion" in set(fidelity["measure"])
    assert {"volume_ratio_wmh", "volume_ratio_tumour"} <= set(fidelity["measure"])
    # tissue fractions gated like for like (each mode against the training maps of its phenotype;
    # the tiny cohort's "both" maps are the unseen mode's), the plain pooled figure beside, ungated
    tissue = fidelity[fidelity["group"] == "tissue"].set_index("measure")
    like = tissue.loc["fraction_csf_relative_difference"]
    modes = re.search(r"modes (\S+) against", like["note"]).group(1).split(",")
    assert "unseen" in modes and set(modes) <= {"healthy", "wmh_only", "tumour_only", "unseen"}
    assert like["target"] == "|x| <= 0.15" and like["n"] == 3 * len(modes)
    plain = tissue.loc["fraction_csf_relative_difference_all_modes"]
    assert plain["n"] == 12 and pd.isna(plain["target"]) and pd.isna(plain["pass"])
    recon = pd.read_csv(syn / "quality" / "label_reconstruction.tsv", sep="\t")
    assert {"train", "held_out"} == set(recon["split"])
    # label FID beside the held-out real maps and the LDM's ceiling (held-out maps through the
    # VAE); the tiny cohort's 3 held-out maps are too few for k-NN manifolds (k = 3): nan
    dist = fidelity[fidelity["group"] == "distribution"].set_index("measure")
    n_held, n_train = (recon.loc[recon["split"] == split, "subject"].nunique() for split in ("held_out", "train"))
    for s, n_set in (("synthetic", 12), ("held_out", n_held), ("reconstructed_held_out", n_held)):
        assert dist.loc[f"fid_{s}_vs_training", "n"] == n_set and dist.loc[f"fid_{s}_vs_training", "value"] >= 0
        for m in ("precision", "recall"):
            assert dist.loc[f"{m}_{s}", "n"] == n_set
            assert (min(n_set, n_train) > 3) == np.isfinite(dist.loc[f"{m}_{s}", "value"])
    samples = pd.read_csv(syn / "quality" / "label_adherence_samples.tsv", sep="\t")
    per_mode = samples["mode"].value_counts()
    assert {"healthy", "unseen"} <= set(per_mode.index)  # + <type>_only per type in training
    assert (per_mode == 3).all()
    sample_qc = pd.read_csv(syn / "quality" / "sample_qc.tsv", sep="\t")
    assert list(sample_qc["sample"]) == list(manifest["subject"]) and sample_qc["flagged"].dtype == bool

    # the default config's far-OOD style set: the same labels, imaged with the far-OOD site's
    # styles, in the one modality that site delivers
    far = syn / "style_sets" / "far-ood"
    styled = pd.read_csv(far / "manifest.tsv", sep="\t")
    assert list(styled["subject"]) == list(manifest["subject"])
    assert list(styled.columns) == ["subject", "seed", "style_flair"]
    assert set(styled["style_flair"]) == {"demo006"}  # the tiny cohort's one far-OOD subject
    for sid in manifest["subject"]:
        a = nib.load(syn / "samples" / sid / "flair.nii.gz").get_fdata()
        b = nib.load(far / "samples" / sid / "flair.nii.gz").get_fdata()
        assert a.shape == b.shape and not np.array_equal(a, b)
        assert sorted(p.name for p in (far / "samples" / sid).iterdir()) == ["flair.nii.gz"]
    # the FLAIR-only subject: anchored on its FLAIR, no T1 anywhere, its FLAIR scored by the T1 model
    res = tmp_path / "results" / EXP
    assert sorted(p.name for p in (res / "cohort" / "demo006").iterdir()) == [
        "brain_mask.nii.gz", "flair.nii.gz", "label.nii.gz"]
    folder = res / "preprocessing" / "subjects" / "demo006"
    assert sorted(p.name for p in (folder / "n4").iterdir()) == ["flair.nii.gz"]
    assert json.loads((folder / "skull_strip" / "qc.json").read_text())["skull_strip_dice"] > 0.9
    assert (res / "segmentation" / "tissue3" / "R" / "predictions" / "far_ood" / "demo006.nii.gz").is_file()

    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code == 0 and "Nothing to be done" in out, out[-2000:]

    # the decoder's calibration (config.yaml: tissue) is a stage of its own: background and tissue
    # offsets only; changing it reruns the calibration and what decodes with it, never the VAE,
    # the LDM or the image generator
    calibration = json.loads((gen / "label_vae_calibration.json").read_text())
    assert calibration["mode"] == "tissue" and len(calibration["class_offsets"]) == 10
    assert calibration["class_offsets"][6:] == [0, 0, 0, 0]  # wmh, necrotic, oedema, enhancing
    assert calibration["score_after"] >= calibration["score_before"]
    off = {**cfg, "label_generator": {**cfg["label_generator"], "calibration": "none"}}
    code, out = run_snakemake(tmp_path, "-n", config=off)
    jobs = planned_jobs(out)
    assert code == 0 and {"calibrate_label_vae", "sample_synthetic", "label_generator_fidelity"} <= set(jobs), jobs
    assert not {"train_label_vae", "train_label_ldm", "train_image_generator"} & set(jobs), jobs

    # the compose weights (config.yaml: fit) are a stage after the LDM (rule fit_compose_weight),
    # fitted on the trained model and read by sampling and the audit: a given weight instead
    # reruns those, and trains and fits nothing again
    fitted = json.loads((gen / "label_compose_weight.json").read_text())
    assert set(fitted["compose_weight"]) == {"wmh", "tumour"} and fitted["requests"] == 8
    assert "compose weight of wmh" in (tmp_path / "logs" / EXP / "generators" / "fit_compose_weight.log").read_text()
    given = json.loads(json.dumps(cfg))
    given["label_generator"]["sampling"]["compose_weight"] = 1
    code, out = run_snakemake(tmp_path, "-n", config=given)
    jobs = planned_jobs(out)
    assert code == 0 and {"sample_synthetic", "label_generator_fidelity"} <= set(jobs), jobs
    assert not {"train_label_vae", "calibrate_label_vae", "train_label_ldm", "fit_compose_weight",
                "train_image_generator"} & set(jobs), jobs

    # the tissue offsets (config.yaml: fit) and the deformation (TINY_GEN: fit) are fitted after the
    # LDM on maps drawn at the training maps' conditioning, and read by sampling, the compose-weight fit and the
    # audit's samples: none for both instead reruns those, and trains nothing again
    sampling_cal = json.loads((gen / "label_sampling_calibration.json").read_text())
    n_training = json.loads((gen / "label_ldm_config.json").read_text())["n_training"]
    assert set(sampling_cal["tissue_offsets"]) == {"csf", "gm", "wm", "deep_gm", "brainstem"}
    assert sampling_cal["tissue_fit"]["maps"] == 2 * n_training                 # two at each training map's
    warp = sampling_cal["deformation"]
    # tumour, wmh, both: each phenotype drawn twice but held by one training map, so no pairwise
    # Dice on the training side: one pooled group, no size per phenotype
    assert warp["maps"] == 2 * n_training and warp["grouping"] == "pooled" and warp["std_mm_by_phenotype"] == {}
    assert 0 <= warp["std_mm"] <= 8 and warp["pairwise_dice_after"] <= warp["pairwise_dice_before"]
    fit_log = (tmp_path / "logs" / EXP / "generators" / "fit_label_sampling.log").read_text()
    assert "tissue offsets at sampling" in fit_log and "deformation" in fit_log
    fidelity = pd.read_csv(tmp_path / "results" / EXP / "synthesis" / "quality" / "label_fidelity.tsv", sep="\t")
    assert float(fidelity.set_index("measure").loc["deformation_std_mm", "value"]) == pytest.approx(warp["std_mm"])
    plain = json.loads(json.dumps(cfg))
    plain["label_generator"]["sampling"].update(tissue_offsets="none", deformation="none")
    code, out = run_snakemake(tmp_path, "-n", config=plain)
    jobs = planned_jobs(out)
    assert code == 0 and {"fit_compose_weight", "sample_synthetic", "label_generator_fidelity"} <= set(jobs), jobs
    assert not {"train_label_vae", "calibrate_label_vae", "train_label_ldm", "fit_label_sampling",
                "train_image_generator"} & set(jobs), jobs
    # the deformation alone: the fit reruns (its settings changed), then what samples
    warped = json.loads(json.dumps(cfg))
    warped["label_generator"]["sampling"]["tissue_offsets"] = "none"
    code, out = run_snakemake(tmp_path, "-n", config=warped)
    jobs = planned_jobs(out)
    assert code == 0 and {"fit_label_sampling", "fit_compose_weight", "sample_synthetic",
                          "label_generator_fidelity"} <= set(jobs), jobs
    assert not {"train_label_vae", "calibrate_label_vae", "train_label_ldm", "train_image_generator"} & set(jobs), jobs

    # unrequested_lesions (config.yaml: remove) resolves each map's lesion types by its request
    # after decoding; the main set asks for both types ('unseen'): nothing to remove. The audit
    # counts per mode what was removed. keep instead reruns the sampling fit (it judges the maps
    # as the samples carry them), what reads it, sampling and the audit; no training
    assert (manifest["unrequested_lesion_voxels"] == 0).all()
    assert "removed from the samples" in fidelity.set_index("measure").loc["healthy_unrequested_voxels", "note"]
    kept = json.loads(json.dumps(cfg))
    kept["label_generator"]["sampling"]["unrequested_lesions"] = "keep"
    code, out = run_snakemake(tmp_path, "-n", config=kept)
    jobs = planned_jobs(out)
    assert code == 0 and {"fit_label_sampling", "fit_compose_weight", "sample_synthetic",
                          "label_generator_fidelity"} <= set(jobs), jobs
    assert not {"train_label_vae", "calibrate_label_vae", "train_label_ldm", "train_image_generator"} & set(jobs), jobs

    # label consistency: the run's real-only tissue arm (its nnU-Net) reads the synthetic
    # images, scored against their labels beside its real test Dice
    table = pd.read_csv(syn / "quality" / "label_consistency_tissue3.tsv", sep="\t")
    assert list(table["class"]) == ["csf", "gm", "wm"] and set(table["arm"]) == {"R"}
    assert set(table["subset"]) == {"all"}  # no lesion class: no requested / unrequested rows
    assert sorted(p.name for p in (syn / "quality" / "label_consistency" / "tissue3").glob("*.nii.gz")) == [
        f"{sid}.nii.gz" for sid in manifest["subject"]]
    real = pd.read_csv(tmp_path / "results" / EXP / "segmentation" / "tissue3" / "R" / "scores.tsv", sep="\t")
    real = real[(real["metric"] == "dice") & (real["test_set"] == "in_distribution")].groupby("class")["value"].mean()
    for row in table.to_dict("records"):
        assert row["real_dice"] == pytest.approx(real[row["class"]])
        assert row["n_synthetic"] <= n and (row["n_synthetic"] == 0 or 0 <= row["synthetic_dice"] <= 1)
        assert row["gap"] == pytest.approx(row["real_dice"] - row["synthetic_dice"], nan_ok=True)
    # the same model's encoder as the feature extractor of the image FID
    fid = pd.read_csv(syn / "quality" / "image_fid_tissue3.tsv", sep="\t").set_index("set")
    assert list(fid.index) == ["held_out_real (in_distribution)", "synthetic"]
    assert fid.loc["synthetic", "n"] == n and (fid["n_reference"] == 3).all()  # the R arm's 3 real cases
    assert fid.loc["synthetic", "fid"] > 0 and np.isnan(fid.loc["held_out_real (in_distribution)", "fid"])  # 1 case
    assert "encoder" in fid.loc["synthetic", "extractor"]

    # a second generator on the same label maps (gmm: no training) and the generator benchmark:
    # an arm drawing from it trains, and the benchmark scores it against the real arm R
    bench_cfg = {**cfg, "segmentation": {
        **cfg["segmentation"], "arms": ["R", "Sg"], "recipes": {"Sg": {"synthetic": 1.0, "generator": "gmm"}}}}
    bench_cfg["generator_benchmark"] = {"comparisons": [
        {"task": "tissue3", "test_set": "in_distribution", "reference": "R", "arms": ["Sg"]}]}
    run_snakemake(tmp_path, f"results/{EXP}/benchmark/generators.csv", config=bench_cfg, check=True)
    gmm = syn / "gmm"
    gmm_manifest = pd.read_csv(gmm / "manifest.tsv", sep="\t")
    assert list(gmm_manifest["subject"]) == list(manifest["subject"]) and set(gmm_manifest["generator"]) == {"gmm"}
    for sid in manifest["subject"]:
        label = nib.load(syn / "samples" / sid / "label.nii.gz").get_fdata()
        assert np.array_equal(nib.load(gmm / "samples" / sid / "label.nii.gz").get_fdata(), label)
        for m in ("t1", "t2", "flair"):
            img = nib.load(gmm / "samples" / sid / f"{m}.nii.gz").get_fdata()
            assert img.shape == label.shape and img.min() >= 0 and img.max() <= 1
            assert not img[label == 0].any() and img[label > 0].std() > 0
    bench = pd.read_csv(res / "benchmark" / "generators.csv").set_index("arm")
    assert list(bench.index) == ["R", "Sg"] and list(bench["generator"]) == ["real", "gmm"]
    assert bench.loc["Sg", "n_synthetic"] == n and bench.loc["R", "n_synthetic"] == 0
    sg = pd.read_csv(res / "segmentation" / "tissue3" / "Sg" / "scores.tsv", sep="\t")
    sg = sg[(sg["metric"] == "dice") & (sg["test_set"] == "in_distribution")]
    assert bench.loc["Sg", "dice_mean"] == pytest.approx(sg.groupby("subject")["value"].mean().mean())
    bench_dir = res / "benchmarks" / "generators"
    timed = {r: pd.read_csv(bench_dir / f"{r}.tsv", sep="\t")["s"].iloc[0]
             for r in ("train_label_vae", "calibrate_label_vae", "train_label_ldm", "fit_label_sampling",
                       "fit_compose_weight", "synthesize_gmm")}
    assert bench.loc["Sg", "training_s"] == pytest.approx(
        timed["train_label_vae"] + timed["calibrate_label_vae"] + timed["train_label_ldm"] + timed["fit_label_sampling"]
        + timed["fit_compose_weight"])
    assert bench.loc["Sg", "sampling_s_per_volume"] == pytest.approx(timed["synthesize_gmm"] / n)
    assert bench.loc["Sg", "peak_rss_mb"] > 0
    fid = pd.read_csv(res / "benchmark" / "quality" / "image_fid_tissue3_gmm.tsv", sep="\t").set_index("set")
    assert bench.loc["Sg", "image_fid"] == pytest.approx(fid.loc["synthetic", "fid"]) and fid.loc["synthetic", "fid"] > 0
    assert (res / "benchmark" / "generators.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the quality of the generator's samples, beside the real baselines in the real row
    quality = pd.read_csv(res / "benchmark" / "quality" / "generator_quality_gmm.tsv", sep="\t")
    quality = quality.set_index(["measure", "item"])
    assert bench.loc["Sg", "ms_ssim"] == pytest.approx(quality.loc[("ms_ssim", "t1"), "synthetic"])
    assert bench.loc["R", "ms_ssim"] == pytest.approx(quality.loc[("ms_ssim", "t1"), "real"])
    assert 0 <= bench.loc["Sg", "conditioning_adherence"] <= 1 and bench.loc["Sg", "volume_abs_d"] >= 0
    assert bench.loc["Sg", "nearest_training_dice"] == pytest.approx(
        quality.loc[("nearest_training_dice", "mean"), "synthetic"])


def test_drop_flagged_samples_feeds_the_sample_qc_to_synthetic_arms_only(tmp_path):
    import copy


    cfg = copy.deepcopy(TINY_GEN)
    # Su draws from a sample set (other conditioning): the QC table does not cover its samples
    cfg["segmentation"] = {"tasks": ["tumour"], "arms": ["R", "S", "Su"], "task_definitions": {"tumour": {}},
                           "recipes": {"Su": {"synthetic": 1.0, "sample_set": "u"}}}
    cfg["synthesis"]["qc"] = {"drop_flagged": True}
    cfg["synthesis"]["sample_sets"] = {"u": {"conditioning": "unseen", "n_samples": 3}}
    code, out = run_snakemake(tmp_path, "-n", "--printshellcmds", config=cfg)
    assert code == 0, out[-3000:]
    blocks = {re.search(r"wildcards: (.*)", b).group(1): b
              for b in re.split(r"\n(?=rule |localrule )", out) if b.startswith("rule assemble_nnunet_dataset")}
    assert set(blocks) == {"task=tumour, arm=R", "task=tumour, arm=S", "task=tumour, arm=Su"}
    assert "synthesis/quality/sample_qc.tsv" in blocks["task=tumour, arm=S"]
    assert "sample_qc.tsv" not in blocks["task=tumour, arm=R"]
    assert "sample_qc.tsv" not in blocks["task=tumour, arm=Su"]
    assert "synthesis/sample_sets/u/samples/synth0003/label.nii.gz" in blocks["task=tumour, arm=Su"]
    assert "synthesis/samples/" not in blocks["task=tumour, arm=Su"]
    assert "rule sample_synthetic_u:" in out
    # the real tumour model scores the main set's lesions split by what each sample asked for
    consistency = [b for b in re.split(r"\n(?=rule |localrule )", out)
                   if b.startswith("rule synthetic_label_consistency") and "task=tumour" in b]
    assert len(consistency) == 1 and "synthesis/manifest.tsv" in consistency[0], out[-3000:]


def test_arms_draw_from_the_generator_their_recipe_names(tmp_path):
    """An arm naming generator: gmm trains on the gmm images of its sample set's label maps, one
    naming lesion_insertion on that generator's samples; their rules run for those arms only."""
    import copy

    cfg = copy.deepcopy(TINY_GEN)
    cfg["segmentation"] = {"tasks": ["tumour"], "arms": ["S", "Sg", "Sgu", "Sl", "Sd"],
                           "task_definitions": {"tumour": {}},
                           "recipes": {"Sg": {"synthetic": 1.0, "generator": "gmm"},
                                       "Sgu": {"synthetic": 1.0, "sample_set": "u", "generator": "gmm"},
                                       "Sl": {"synthetic": 1.0, "generator": "lesion_insertion"},
                                       "Sd": {"synthetic": 1.0, "generator": "spade_diffusion"}}}
    cfg["synthesis"]["sample_sets"] = {"u": {"conditioning": "unseen", "n_samples": 2}}
    code, out = run_snakemake(tmp_path, "-n", "--printshellcmds", config=cfg)
    assert code == 0, out[-3000:]
    jobs = planned_jobs(out)
    assert jobs.get("synthesize_gmm") == 1 and jobs.get("synthesize_gmm_u") == 1, jobs
    assert jobs.get("insert_lesions") == 1 and "insert_lesions_u" not in jobs, jobs
    assert jobs.get("train_spade_diffusion") == 1 and jobs.get("sample_spade_diffusion") == 1, jobs
    blocks = {re.search(r"wildcards: (.*)", b).group(1): b
              for b in re.split(r"\n(?=rule |localrule )", out) if b.startswith("rule assemble_nnunet_dataset")}
    assert "synthesis/gmm/samples/synth0003/flair.nii.gz" in blocks["task=tumour, arm=Sg"]
    assert "synthesis/samples/" not in blocks["task=tumour, arm=Sg"]
    assert "synthesis/sample_sets/u/gmm/samples/synth0002/t1.nii.gz" in blocks["task=tumour, arm=Sgu"]
    assert "gmm/" not in blocks["task=tumour, arm=S"]
    assert "synthesis/lesion_insertion/samples/synth0003/t1.nii.gz" in blocks["task=tumour, arm=Sl"]
    assert "synthesis/lesion_insertion/samples/synth0003/label.nii.gz" in blocks["task=tumour, arm=Sl"]
    assert "synthesis/spade_diffusion/samples/synth0001/flair.nii.gz" in blocks["task=tumour, arm=Sd"]
    design = tmp_path / "results" / EXP / "segmentation" / "design.tsv"
    run_snakemake(tmp_path, str(design.relative_to(tmp_path)), config=cfg, check=True)
    table = pd.read_csv(design, sep="\t", keep_default_na=False).set_index("arm")
    assert table["generator"].to_dict() == {"S": "brainspade", "Sg": "gmm", "Sgu": "gmm", "Sl": "lesion_insertion",
                                            "Sd": "spade_diffusion"}

    explicit = copy.deepcopy(cfg)
    explicit["synthesis"].update(conditioning="explicit", conditioning_values=[[0.2, 0.0]])
    code, out = run_snakemake(tmp_path, "-n", config=explicit)
    assert code != 0 and "segmentation.recipes.Sl" in out and "conditioning" in out, out[-3000:]

    cfg["segmentation"]["recipes"]["Sg"]["style_set"] = "far-ood"
    code, out = run_snakemake(tmp_path, "-n", config=cfg)
    assert code != 0 and "segmentation.recipes.Sg" in out and "Traceback" not in out, out[-3000:]
    # without such arms their rules stay out of the DAG
    code, out = run_snakemake(tmp_path, "-n", config=TINY_GEN)
    assert code == 0 and not {"synthesize_gmm", "insert_lesions", "train_spade_diffusion"} & set(planned_jobs(out))


def test_spade_diffusion_images_only_the_modalities_its_arms_read(tmp_path):
    """Each SPADE diffusion image is a full DDIM chain: a FLAIR-only task's arm gets FLAIR images
    and no T1 / T2 is drawn; an arm on the T1 + FLAIR task adds T1."""
    import copy

    cfg = copy.deepcopy(TINY_GEN)
    cfg["segmentation"] = {"tasks": ["tumour"], "arms": ["Sd"],
                           "task_definitions": {"tumour": {"modalities": ["flair"]}},
                           "recipes": {"Sd": {"synthetic": 1.0, "generator": "spade_diffusion"}}}

    def drawn(config):
        code, out = run_snakemake(tmp_path, "-n", config=config)
        assert code == 0, out[-3000:]
        block = next(b for b in re.split(r"\n(?=rule |localrule )", out) if b.startswith("rule sample_spade_diffusion:"))
        return sorted({m for m in ("t1", "t2", "flair") if f"synth0001/{m}.nii.gz" in block})

    assert drawn(cfg) == ["flair"]
    cfg["segmentation"]["task_definitions"]["tumour"]["modalities"] = ["t1", "flair"]
    assert drawn(cfg) == ["flair", "t1"]


def test_drop_flagged_samples_unit(tmp_path):
    from brainsynth.errors import InputError
    from brainsynth.experiment import drop_flagged_samples

    qc = tmp_path / "sample_qc.tsv"
    pd.DataFrame({"sample": ["synth0001", "synth0002"], "flagged": [True, False]}).to_csv(qc, sep="\t", index=False)
    cases = {"demo001": {"source": "real"}, "synth0001": {"source": "synthetic"}, "synth0002": {"source": "synthetic"}}
    kept, dropped = drop_flagged_samples(cases, qc)
    assert dropped == ["synth0001"] and set(kept) == {"demo001", "synth0002"}
    with pytest.raises(InputError, match="drop_flagged"):
        drop_flagged_samples({"synth0001": {"source": "synthetic"}}, qc)
