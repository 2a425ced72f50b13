"""Rule train_segmentation: nnU-Net training of one (task, arm)."""

import json
import logging
import time
from pathlib import Path

from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_json

log = logging.getLogger("brainsynth")


def main(sm):
    ds = json.loads(Path(sm.input.dataset).read_text())
    roots = seg.as_roots(ds["nnunet_roots"])
    p = sm.params
    device = seg.resolve_device(p.device)
    # CPU: augmentation in the training process (workers would compete for the same cores; it also
    # keeps training reproducible: nnU-Net's multi-process augmenter is not)
    n_proc_da = 0 if device == "cpu" else max(sm.threads - 1, 1)
    start = time.monotonic()
    folder = seg.train(ds["dataset_id"], roots, configuration=p.configuration, fold=p.fold, trainer=p.trainer,
                       plans=p.plans_identifier, epochs=p.epochs, iterations_per_epoch=p.iterations_per_epoch,
                       val_iterations_per_epoch=p.val_iterations_per_epoch, device=device,
                       num_processes=sm.threads, n_proc_da=n_proc_da, threads=sm.threads,
                       final_validation=p.final_validation, seed=p.seed, log=sm.log.nnunet)
    seconds = time.monotonic() - start
    fold_dir = folder / f"fold_{p.fold}"
    log.info("trained %s in %.0f s on %s (%d threads)", folder, seconds, device, sm.threads)
    save_json({
        "task": ds["task"], "arm": ds["arm"], "dataset_id": ds["dataset_id"],
        "model_folder": str(folder), "fold": p.fold, "checkpoint": str(fold_dir / "checkpoint_final.pth"),
        "configuration": p.configuration, "trainer": p.trainer, "plans": p.plans_identifier,
        "epochs": p.epochs, "iterations_per_epoch": p.iterations_per_epoch,
        "device": device, "threads": sm.threads, "train_seconds": round(seconds, 1),
        "n_real": ds["n_real"], "n_synthetic": ds["n_synthetic"],
    }, sm.output.model)


run_main(main, snakemake)  # noqa: F821
