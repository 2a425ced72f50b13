"""Rule synthetic_image_fid: synthetic vs real images on the real-data nnU-Net's encoder features."""

import json
import logging
from pathlib import Path

import pandas as pd

from brainsynth import segmentation as seg
from brainsynth.feature_metrics import against_reference
from brainsynth.io import run_main, save_table

log = logging.getLogger("brainsynth")


def main(sm):
    model = json.loads(Path(sm.input.model).read_text())
    # one pass of the model over all sets (case ids prefixed by their set: unique across sets)
    cases = [{"case_id": f"{name}.{c}", "images": imgs} for name, per in sm.params.sets.items()
             for c, imgs in per.items()]
    ids, rows = seg.encoder_features(model["model_folder"], cases, folds=[model["fold"]], device=sm.params.device,
                                     threads=sm.threads)
    names = [i.split(".", 1)[0] for i in ids]
    feats = {name: rows[[n == name for n in names]] for name in sm.params.sets}
    reference = feats.pop("training_real")
    rows = against_reference(reference, feats, k=sm.params.k)
    extractor = (f"nnU-Net {sm.wildcards.task}/{sm.params.arm} encoder, deepest stage: mean and std per channel "
                 f"({reference.shape[1]} values per case)")
    table = pd.DataFrame([{"task": sm.wildcards.task, "arm": sm.params.arm, **r, "reference": "training_real",
                           "k": sm.params.k, "extractor": extractor} for r in rows])
    table["set"] = table["set"].replace({"held_out_real": f"held_out_real ({sm.params.real_test_set})"})
    save_table(table, sm.output[0])
    log.info("image FID of %s:\n%s", sm.wildcards.task, table.drop(columns="extractor").round(4).to_string())


run_main(main, snakemake)  # noqa: F821
