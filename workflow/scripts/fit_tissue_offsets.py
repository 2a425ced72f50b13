"""Rule fit_tissue_offsets: the tissue offsets of the label decoder at sampling, fitted on the
trained label generator."""

from brainsynth.generators.brainspade.tissue_fit import fit_sampling_calibration
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    fit_sampling_calibration(
        sm.input.vae, sm.input.ldm, sm.input.calibration, list(sm.params.preprocessed), sm.output.calibration,
        sampling=dict(sm.params.sampling), schema=LabelSchema.from_config({"labels": sm.params.labels}),
        device=sm.config["label_generator"].get("device") or "auto", num_threads=sm.threads,
    )


run_main(main, snakemake)  # noqa: F821
