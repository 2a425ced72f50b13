"""Rule sample_synthetic: draw synthetic (label, multi-modal image) subjects."""

from brainsynth.generators.brainspade.label_generator import resolve_compose_weight
from brainsynth.generators.brainspade.sampling import sample_synthetic
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    syn = sm.params.synthesis
    samp = resolve_compose_weight(sm.params.sampling, sm.input.get("compose_weight") or None)
    sample_synthetic(
        label_vae=sm.input.vae, label_ldm=sm.input.ldm, image_generator=sm.input.image_generator,
        style_subjects=list(sm.params.styles), n=syn["n_samples"], out_dir=sm.params.out, reference=sm.input.reference,
        conditioning=syn["conditioning"], conditioning_values=syn.get("conditioning_values"),
        seed=syn["seed"], sampling=samp, id_prefix="synth", label_calibration=sm.input.calibration,
        schema=LabelSchema.from_config({"labels": sm.params.labels}),
    )


run_main(main, snakemake)  # noqa: F821
