"""Rule ingest_dataset: a BraTS 2021 or BIDS directory -> sample sheet TSV."""

from brainsynth.errors import InputError
from brainsynth.ingest import ingest_bids, ingest_brats
from brainsynth.io import run_main
from brainsynth.sheet import write_sheet


def main(sm):
    root = sm.params.root
    if not root:
        raise InputError("no dataset root given", field="ingest_root",
                         fix="run with --config ingest_root=/path/to/dataset")
    layout = sm.wildcards.layout
    df = ingest_brats(root) if layout == "brats" else ingest_bids(root)
    write_sheet(df, sm.output[0])


run_main(main, snakemake)  # noqa: F821
