# brainSPADE-style synthesis workflow:
#   demo cohort / sample sheet -> preprocessing (N4, registration, skull stripping,
#   working grid) -> generators -> synthetic samples -> nnU-Net arms -> tables.
# Rules live in workflow/rules/*.smk, their scripts in workflow/scripts/, and the
# logic in the importable package workflow/brainsynth.

import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults from the repository; --configfile / --config override them.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, "config/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/preprocessing.smk"
include: "workflow/rules/generators.smk"
include: "workflow/rules/generator_gmm.smk"
include: "workflow/rules/generator_lesion_insertion.smk"
include: "workflow/rules/generator_spade_diffusion.smk"
include: "workflow/rules/segmentation.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    input:
        all_targets(),
        segmentation_targets(),
        benchmark_targets(),
    default_target: True
