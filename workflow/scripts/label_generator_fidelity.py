"""Rule label_generator_fidelity: the label generator's reconstruction and adherence audit."""

from brainsynth.generators.brainspade.label_generator import resolve_compose_weight
from brainsynth.generators.label_quality import evaluate_label_generator
from brainsynth.io import run_main
from brainsynth.labels import LabelSchema


def main(sm):
    q = dict(sm.params.quality)
    evaluate_label_generator(
        sm.input.vae, sm.input.ldm, dict(sm.params.training), dict(sm.params.held_out), dict(sm.output.items()),
        n_per_mode=int(q.get("samples_per_mode", 50)), seed=int(q.get("seed", 0)),
        schema=LabelSchema.from_config({"labels": sm.params.labels}), voxel_mm=float(sm.params.voxel_mm),
        sampling=resolve_compose_weight(sm.params.sampling, sm.input.get("compose_weight") or None),
        tissue_tolerance=float(q.get("tissue_tolerance", 0.15)),
        calibration=sm.input.calibration, sampling_calibration=sm.input.sampling_calibration,
    )


run_main(main, snakemake)  # noqa: F821
