"""Rule predict_segmentation: one (task, arm) model on every test set."""

import contextlib
import json
import logging
from collections import defaultdict
from pathlib import Path

import pandas as pd

from brainsynth import segmentation as seg
from brainsynth.io import run_main, save_table

log = logging.getLogger("brainsynth")


def main(sm):
    model = json.loads(Path(sm.input.model).read_text())
    outputs = {Path(o).name[: -len(".nii.gz")]: Path(o) for o in sm.output.predictions}
    by_set = defaultdict(list)
    for case in sm.params.cases:
        by_set[case["test_set"]].append({"case_id": case["case_id"], "images": case["images"]})
    with open(sm.log[0], "a") as sink, contextlib.redirect_stdout(sink):  # nnU-Net prints
        for test_set, cases in by_set.items():
            out_dir = outputs[cases[0]["case_id"]].parent
            written = seg.predict(model["model_folder"], cases, out_dir, folds=[model["fold"]],
                                  device=sm.params.device, tile_step_size=sm.params.tile_step_size,
                                  use_mirroring=sm.params.use_mirroring, threads=sm.threads)
            for cid, path in written.items():
                if Path(path).resolve() != outputs[cid].resolve():
                    raise RuntimeError(f"prediction of {cid} written to {path}, expected {outputs[cid]}")
            log.info("%s: %d cases predicted into %s", test_set, len(written), out_dir)
    save_table(pd.DataFrame([{"subject": c["case_id"], "test_set": c["test_set"],
                              "prediction": str(outputs[c["case_id"]])} for c in sm.params.cases]),
               sm.output.manifest)


run_main(main, snakemake)  # noqa: F821
