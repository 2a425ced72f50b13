"""Train the brainSPADE generators at the unit tests' tiny settings, sample three subjects and
print the sha256 of every file written (run by test_brainspade_plugin.py on two source trees).

    python tests/brainspade_outputs.py OUT_DIR     (PYTHONPATH: a tree's workflow/, TESTS_DIR: its tests/)
"""

import hashlib
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

sys.path.insert(0, os.environ["TESTS_DIR"])
try:
    from brainsynth.generators.brainspade import image_generator as IG
    from brainsynth.generators.brainspade import label_generator as LG
    from brainsynth.generators.brainspade import sampling as S
except ImportError:  # the layout before generators/brainspade/
    from brainsynth.generators import image_generator as IG
    from brainsynth.generators import label_generator as LG
    from brainsynth.generators import sampling as S
import test_generators as T  # noqa: E402

# float32 CPU training went channels-last after the move, a rounding change of its own (tested in
# test_generators.py): both trees train in the old layout here, so the comparison sees the move only
try:
    from brainsynth.generators import common as _common
except ImportError:
    _common = None
if hasattr(_common, "training_layout"):
    _common.training_layout = lambda model, device, amp: "contiguous"


def main(out):
    cohort = out / "cohort"
    cohort.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels, images, rows = [], {"t1": [], "t2": []}, []
    for i in range(4):
        lab = T._brain(i, rng)
        p = cohort / f"sub{i}_labelprob.nii.gz"
        nib.save(nib.Nifti1Image(np.eye(T.K, dtype=np.float32)[lab], T.AFFINE), p)
        labels.append(str(p))
        for m, lut in (("t1", T.T1), ("t2", T.T2)):
            q = cohort / f"sub{i}_{m}.nii.gz"
            nib.save(nib.Nifti1Image(lut[lab], T.AFFINE), q)
            images[m].append(str(q))
        rows.append({"subject": f"sub{i}", "dc_wmh": float((lab == 6).sum()), "dc_tumour": float((lab >= 7).sum())})
    cond = pd.DataFrame(rows)
    for c in ("dc_wmh", "dc_tumour"):
        cond[c] = cond[c] / cond[c].max()
    cond.to_csv(cohort / "cond.tsv", sep="\t", index=False)
    # float32: the code before the move had no mixed precision on CPU; the image generator's
    # lesion levers at the defaults of the move (DEFAULTS changed them on 2026-12-05)
    label_cfg = dict(T.LABEL_CFG, amp=False)
    image_cfg = dict(T.IMAGE_CFG, amp=False, rare_class_oversample=0.5,
                     weights={**T.IMAGE_CFG.get("weights", {}), "class_l1": 3.0})
    if "output_block_channels" in IG.DEFAULTS:  # the decoder of the move (DEFAULTS added a block on 2026-12-05)
        image_cfg["output_block_channels"] = 0
    vae = LG.train_label_vae(labels, label_cfg, out / "vae")
    ldm = LG.train_label_ldm(vae["model"], labels, cohort / "cond.tsv", label_cfg, out / "ldm")
    img = IG.train_image_generator(labels, images, image_cfg, out / "img")
    styles = [{"subject": f"sub{i}", "t1": images["t1"][i], "t2": images["t2"][i]} for i in range(4)]
    S.sample_synthetic(label_vae=vae["model"], label_ldm=ldm["model"], image_generator=img["model"],
                       style_subjects=styles, n=3, reference=labels[0], conditioning="random", seed=4, steps=3,
                       out_dir=out / "samples")
    for f in sorted(p for p in out.rglob("*") if p.is_file() and "cohort" not in p.parts):
        print(hashlib.sha256(f.read_bytes()).hexdigest(), f.relative_to(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
