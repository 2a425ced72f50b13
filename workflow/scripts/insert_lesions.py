"""Rule insert_lesions: real healthy subjects with lesions grown in."""

from brainsynth.generators.lesion_insertion import insert_lesions
from brainsynth.io import run_main


def main(sm):
    hosts = {h["subject"]: {k: v for k, v in h.items() if k != "subject"} for h in sm.params.hosts}
    labels = sm.config["labels"]
    insert_lesions(hosts=hosts, training_labels={s: h["label"] for s, h in hosts.items()},
                   subjects=list(sm.params.subjects), out_dir=sm.params.out, modalities=list(sm.params.modalities),
                   classes=dict(labels["classes"]), lesion_types=dict(labels["lesion_types"]),
                   conditioning=sm.params.conditioning, seed=sm.params.seed, contrasts=dict(sm.params.contrasts))


run_main(main, snakemake)  # noqa: F821
