"""Rule predict_segmentation: one (task, arm) model on one test set."""

import contextlib
import json
import logging
from pathlib import Path

import pandas as pd

from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_table

log = logging.getLogger("brainsynth")


def main(sm):
    model = json.loads(Path(sm.input.model).read_text())
    out_dir = Path(sm.output.predictions)
    cases = [{"case_id": c["case_id"], "images": c["images"]} for c in sm.params.cases]
    with open(sm.log[0], "a") as sink, contextlib.redirect_stdout(sink):  # nnU-Net prints
        written = seg.predict(model["model_folder"], cases, out_dir, folds=[model["fold"]],
                              device=sm.params.device, tile_step_size=sm.params.tile_step_size,
                              use_mirroring=sm.params.use_mirroring, threads=sm.threads)
    expected = {c["case_id"]: out_dir / f"{c['case_id']}.nii.gz" for c in cases}
    for cid, path in written.items():
        if Path(path).resolve() != expected[cid].resolve():
            raise RuntimeError(f"prediction of {cid} written to {path}, expected {expected[cid]}")
    log.info("%s: %d cases predicted into %s", sm.wildcards.test_set, len(written), out_dir)
    save_table(pd.DataFrame([{"subject": c["case_id"], "test_set": c["test_set"],
                              "prediction": str(expected[c["case_id"]])} for c in sm.params.cases]),
               sm.output.manifest)


run_main(main, snakemake)  # noqa: F821
