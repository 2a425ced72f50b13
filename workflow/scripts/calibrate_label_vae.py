"""Rule calibrate_label_vae: the label VAE's class offsets, fitted on its training maps."""

from brainsynth.generators.brainspade.label_generator import calibrate_label_vae, resolve_config
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    given = {k: getattr(sm.params, k) for k in ("calibration", "device") if getattr(sm.params, k) is not None}
    cfg = resolve_config(given)  # DEFAULTS for what the config leaves out
    calibrate_label_vae(sm.input.vae, list(sm.params.preprocessed), cfg["calibration"], sm.output.calibration,
                        schema=LabelSchema.from_config({"labels": sm.params.labels}), device=cfg["device"],
                        num_threads=sm.threads)


run_main(main, snakemake)  # noqa: F821
