"""Rule qc_montage: one PNG per subject (native T1 + mask, working-grid images, labels)."""

import json

from brainsynth.io import run_main
from brainsynth.qc import subject_montage


def main(sm):
    qc = json.loads(open(sm.input.qc).read())
    subject_montage(sm.output[0], sm.wildcards.subject, sm.input.t1, sm.input.mask,
                    dict(zip(sm.params.modalities, sm.input.images)), sm.input.label,
                    n_classes=sm.params.n_classes, dice=qc.get("skull_strip_dice"))


run_main(main, snakemake)  # noqa: F821
