"""Rule fit_label_sampling: what the label decoder samples with, fitted on the trained label
generator (tissue offsets, the size of each map's random deformation)."""

from brainsynth.generators.brainspade.sampling_calibration import fit_sampling_calibration
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    fit_sampling_calibration(
        sm.input.vae, sm.input.ldm, sm.input.calibration, list(sm.params.preprocessed), sm.output.calibration,
        tissue_offsets=sm.params.fit["tissue_offsets"], deformation=sm.params.fit["deformation"],
        sampling=dict(sm.params.sampling), schema=LabelSchema.from_config({"labels": sm.params.labels}),
        device=sm.config["label_generator"].get("device") or "auto", num_threads=sm.threads,
    )


run_main(main, snakemake)  # noqa: F821
