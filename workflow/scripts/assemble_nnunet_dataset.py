"""Rule assemble_nnunet_dataset: task labels + nnU-Net raw dataset of one (task, arm)."""

import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from brainsynth import experiment as design
from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_json

log = logging.getLogger("brainsynth")


def main(sm):
    groups = sm.params.classes
    lut = design.forward_lut(groups, sm.params.n_schema_classes)
    labels = design.nnunet_labels(groups)
    labels_dir, raw = Path(sm.output.labels), Path(sm.output.raw)
    for d in (labels_dir, raw):
        shutil.rmtree(d, ignore_errors=True)
    labels_dir.mkdir(parents=True)
    cases, records = [], []
    specs = dict(sm.params.cases)
    if sm.params.drop_flagged:
        specs, dropped = design.drop_flagged_samples(specs, sm.input.sample_qc[0])
        log.info("%s/%s: synthesis.qc.drop_flagged left out %d flagged synthetic samples: %s",
                 sm.wildcards.task, sm.wildcards.arm, len(dropped), ", ".join(dropped) or "none")
    for cid, spec in specs.items():
        dst = labels_dir / f"{cid}.nii.gz"
        design.remap_label_file(spec["label"], dst, lut)
        counts = np.bincount(np.asarray(nib.load(dst).dataobj).ravel(), minlength=len(labels))
        cases.append({"case_id": cid, "images": spec["images"], "label": dst})
        records.append({"case_id": cid, "source": spec["source"], "label_source": spec["label"],
                        **({"style_set": spec["style_set"]} if spec.get("style_set") else {}),
                        "voxels": {name: int(counts[v]) for name, v in labels.items() if name != "background"}})
    missing = design.check_foreground({r["case_id"]: r["voxels"] for r in records}, sm.wildcards.task,
                                      sm.wildcards.arm)
    if missing:
        log.warning("%s/%s: no training voxel of %s; the model cannot learn them", sm.wildcards.task,
                    sm.wildcards.arm, missing)
    n_real = sum(r["source"] == "real" for r in records)
    log.info("%s/%s: %d cases (%d real, %d synthetic), labels %s", sm.wildcards.task, sm.wildcards.arm,
             len(cases), n_real, len(cases) - n_real, labels)
    folder = seg.assemble_dataset(
        cases, sm.params.dataset_id, sm.params.dataset_name, dict(enumerate(sm.params.modalities)), labels, raw,
        extra={"brainsynth": {"task": sm.wildcards.task, "arm": sm.wildcards.arm,
                              "classes": {k: list(v) for k, v in groups.items()}}})
    save_json({
        "task": sm.wildcards.task,
        "arm": sm.wildcards.arm,
        "dataset_id": int(sm.params.dataset_id),
        "dataset_name": folder.name,
        "nnunet_roots": {k: str(raw.parent / k) for k in ("raw", "preprocessed", "results")},
        "labels": labels,
        "classes": groups,
        "n_real": n_real,
        "n_synthetic": len(cases) - n_real,
        "cases": records,
    }, sm.output.dataset)


run_main(main, snakemake)  # noqa: F821
