"""Rule fit_compose_weight: the weight of each lesion type in composed requests, fitted on the
trained label generator."""

from brainsynth.generators.brainspade.compose_fit import fit_compose_weights
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    fit_compose_weights(
        sm.input.vae, sm.input.ldm, sm.output.weights, sampling=dict(sm.params.sampling),
        calibration=sm.input.calibration, schema=LabelSchema.from_config({"labels": sm.params.labels}),
        device=sm.config["label_generator"].get("device") or "auto", num_threads=sm.threads,
    )


run_main(main, snakemake)  # noqa: F821
