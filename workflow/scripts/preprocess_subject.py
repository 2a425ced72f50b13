"""Rule preprocess_subject: N4, co-registration, registration, skull stripping, working grid and QC of one subject."""

from brainsynth import preprocess as pp
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    pp.set_threads(sm.threads)
    pp.preprocess_subject(
        sm.wildcards.subject, dict(zip(sm.params.modalities, sm.input.images)), sm.output[0],
        template={"t1": sm.input.template, "brain_mask": sm.input.template_mask,
                  "labels": sm.input.template_labels},
        cfg=sm.params.preprocessing, schema=LabelSchema.from_config({"labels": sm.params.labels}),
        label=sm.input.get("label"), truth_mask=sm.input.get("truth"), seed=sm.params.seed,
        **sm.params.subject,  # label_map, label_space, pre_stripped
    )


run_main(main, snakemake)  # noqa: F821
