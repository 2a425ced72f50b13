"""Rule plan_nnunet: nnU-Net fingerprint, planning and preprocessing of one (task, arm)."""

import contextlib
import json
import logging
import shutil
from pathlib import Path

from brainsynth import segmentation as seg
from brainsynth.io import atomic_path, run_main

log = logging.getLogger("brainsynth")


def main(sm):
    ds = json.loads(Path(sm.input.dataset).read_text())
    roots = seg.as_roots(ds["nnunet_roots"])
    shutil.rmtree(roots.preprocessed, ignore_errors=True)  # nothing stale from an earlier dataset
    plans = seg.plan_and_preprocess(
        ds["dataset_id"], roots, configurations=[sm.params.configuration], num_processes=sm.threads,
        plans_overrides=sm.params.plans_overrides or None, plans_identifier=sm.params.plans_identifier,
        threads=sm.threads, log=sm.log.nnunet)
    with contextlib.suppress(OSError):
        roots.results.rmdir()  # created empty by nnU-Net's makedirs; train_segmentation owns it
    conf = json.loads(plans.read_text())["configurations"][sm.params.configuration]
    log.info("plans %s, %s: patch %s, batch %s, features %s", plans.name, sm.params.configuration,
             conf.get("patch_size"), conf.get("batch_size"),
             conf.get("architecture", {}).get("arch_kwargs", {}).get("features_per_stage"))
    with atomic_path(sm.output.plans) as tmp:
        shutil.copyfile(plans, tmp)


run_main(main, snakemake)  # noqa: F821
