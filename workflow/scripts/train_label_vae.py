"""Rule train_label_vae: train (or resume) the label autoencoder."""

from brainsynth.generators.brainspade.label_generator import train_label_vae
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    cfg = dict(sm.params.cfg)
    cfg.setdefault("num_threads", sm.threads)
    train_label_vae(list(sm.params.preprocessed), cfg, sm.params.out,
                    schema=LabelSchema.from_config({"labels": sm.params.labels}))


run_main(main, snakemake)  # noqa: F821
