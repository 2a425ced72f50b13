"""Rule synthesize_gmm: domain-randomised images of a sample set's label maps."""

from brainsynth.generators.gmm import GMMParameters, synthesize_gmm
from brainsynth.io import run_main


def main(sm):
    synthesize_gmm(label_paths=dict(zip(sm.params.subjects, sm.input.labels)), out_dir=sm.params.out,
                   modalities=list(sm.params.modalities), params=GMMParameters.from_config(sm.params.gmm),
                   seed=sm.params.seed, label_source=sm.input.labels[0].rsplit("/", 2)[0])


run_main(main, snakemake)  # noqa: F821
