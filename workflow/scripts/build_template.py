"""Rule build_template: the working-grid template from nilearn's MNI152 2009.

When config ``template.t1`` / ``template.brain_mask`` name a user template (in
MNI space, with skull), they are resampled onto the working grid and replace
the synthetic head T1 and its mask; tissue labels and priors stay MNI152's.
"""

import logging

import nibabel as nib
import numpy as np
from nilearn.image import resample_img

from brainsynth.errors import InputError
from brainsynth.io import run_main, save_nifti
from brainsynth.template import build_template

log = logging.getLogger("brainsynth")


def _resample(path, ref, interpolation):
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise InputError(f"cannot read template image ({exc})", file=path, field="template",
                         fix="give a 3D NIfTI file") from None
    return resample_img(img, target_affine=ref.affine, target_shape=ref.shape[:3],
                        interpolation=interpolation, force_resample=True, copy_header=True).get_fdata()


def main(sm):
    grid = sm.params.grid
    info = build_template(grid["voxel_mm"], grid["shape"], dict(sm.output.items()), sm.params.labels)
    log.info("template on %s grid at %s mm: %s", grid["shape"], grid["voxel_mm"],
             {k: v for k, v in info.items() if k != "affine"})
    user = dict(sm.input.items())
    if user:
        if set(user) != {"t1", "brain_mask"}:
            raise InputError("a user template needs both t1 and brain_mask", field="template",
                             fix="set template.t1 and template.brain_mask, or neither")
        ref = nib.load(sm.output.t1)
        t1 = _resample(user["t1"], ref, "continuous")
        mask = _resample(user["brain_mask"], ref, "nearest") > 0.5
        save_nifti(t1.astype(np.float32), ref.affine, sm.output.t1)
        save_nifti(mask.astype(np.uint8), ref.affine, sm.output.brain_mask)
        log.info("user template %s resampled onto the working grid", user["t1"])


run_main(main, snakemake)  # noqa: F821
