"""Rule resample_to_grid: images, mask, labels and tissue maps on the working grid."""

import nibabel as nib
import numpy as np

from brainsynth import preprocess as pp
from brainsynth.io import run_main, save_json, save_nifti
from brainsynth.labels import LabelSchema


def main(sm):
    pp.set_threads(sm.threads)
    schema = LabelSchema.from_config({"labels": sm.params.labels})
    mods = sm.params.modalities
    norm = sm.params.normalisation
    tcfg = sm.params.tissue_maps
    has_label = "label" in sm.input.keys()
    mask, lab = pp.to_working_grid(
        dict(zip(mods, sm.input.images)), sm.input.mask, sm.input.affine, sm.input.warp,
        sm.input.template, dict(zip(mods, sm.output.images)), sm.output.mask,
        label=sm.input.label if has_label else None, out_label=sm.output.label,
        label_map=sm.params.label_map, schema=schema,
        lower=norm["lower_percentile"], upper=norm["upper_percentile"],
    )
    ref = nib.load(sm.input.template)
    if has_label:
        prob = pp.probabilistic_from_labels(lab, schema, ref.header.get_zooms()[:3],
                                            tcfg["smoothing_mm"])
    else:
        pp.log.info("no label map for %s: tissue maps from Atropos with template priors",
                    sm.wildcards.subject)
        priors = pp.tissue_priors_from_template(sm.input.template_labels, schema,
                                                tcfg["smoothing_mm"])
        prob = pp.probabilistic_from_atropos(sm.output.images[mods.index("t1")], mask, priors,
                                             schema, iterations=tcfg["atropos_iterations"])
        save_nifti(np.argmax(prob, axis=-1).astype(np.uint8), ref.affine, sm.output.label)
    save_nifti(prob, ref.affine, sm.output.tissue, dtype=np.float32)
    save_json(pp.lesion_record(sm.output.label, schema, sm.wildcards.subject, has_label),
              sm.output.lesions)


run_main(main, snakemake)  # noqa: F821
