"""Rule calibrate_label_vae: the label VAE's class offsets, fitted on its training maps."""

from brainsynth.generators.brainspade.label_generator import calibrate_label_vae, resolve_config
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    # the device from the config, not a param: where the fit runs changes no result beyond rounding
    given = {"calibration": sm.params.calibration, "device": sm.config["label_generator"].get("device")}
    cfg = resolve_config({k: v for k, v in given.items() if v is not None})  # DEFAULTS for the rest
    calibrate_label_vae(sm.input.vae, list(sm.params.preprocessed), cfg["calibration"], sm.output.calibration,
                        schema=LabelSchema.from_config({"labels": sm.params.labels}), device=cfg["device"],
                        num_threads=sm.threads)


run_main(main, snakemake)  # noqa: F821
