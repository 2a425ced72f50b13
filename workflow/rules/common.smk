# Shared helpers: subject table, paths, input functions. Parsed on every
# Snakemake start, so it only reads the sample sheet (never image data).

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from snakemake.exceptions import WorkflowError

from brainsynth.errors import InputError
from brainsynth.labels import LabelSchema
from brainsynth import demo as demo_cohort
from brainsynth.sheet import load_sheet
from brainsynth.validate import check_files_exist

EXP = config["experiment"]
R = f"results/{EXP}"
LOGS = f"logs/{EXP}"
MODALITIES = list(config["modalities"])
DEMO = config.get("samples") is None
USER_TEMPLATE = bool(config["template"].get("t1"))

try:
    SCHEMA = LabelSchema.from_config(config)
    if DEMO:
        SUBJECTS = demo_cohort.plan_cohort(config["demo"], config["seed"])
    else:
        SUBJECTS = load_sheet(config["samples"], MODALITIES)
        check_files_exist(SUBJECTS, MODALITIES)
except InputError as exc:
    raise WorkflowError(f"Invalid input: {exc}") from None

SUBJECTS = SUBJECTS.set_index("subject", drop=False)
SUBJECT_IDS = list(SUBJECTS.index)


wildcard_constraints:
    subject="[^/]+",
    modality="|".join(MODALITIES),


def has_column(subject, column):
    """True when the sheet gives this subject a non-empty ``column`` (label, brain_mask)."""
    if DEMO:
        return column in ("label", "brain_mask")
    if column not in SUBJECTS.columns:
        return False
    value = SUBJECTS.loc[subject, column]
    return isinstance(value, str) and value != ""


def raw_path(subject, kind):
    """Native-space input file of a subject: modality, label or brain_mask."""
    if DEMO:
        return f"{R}/cohort/{subject}/{kind}.nii.gz"
    return SUBJECTS.loc[subject, kind]


def raw_inputs(s):
    """All input files of one subject: modalities, and label / brain_mask when given."""
    files = {m: raw_path(s, m) for m in MODALITIES}
    for extra in ("label", "brain_mask"):
        if has_column(s, extra):
            files[extra] = raw_path(s, extra)
    return files


def template_file(name):
    return f"{R}/template/{name}.nii.gz"


def subjects_with(split=None):
    df = SUBJECTS if split is None else SUBJECTS[SUBJECTS["split"] == split]
    return list(df.index)


def label_map(subject):
    """The label_maps entry for the subject's site (None: values are already schema values)."""
    return (config.get("label_maps") or {}).get(str(SUBJECTS.loc[subject, "site"]))


def preprocessing_targets():
    return [
        f"{R}/preprocessing/qc.tsv",
        f"{R}/preprocessing/lesion_proportions.tsv",
    ] + expand(f"{R}/preprocessing/qc/{{subject}}.png", subject=SUBJECT_IDS)


def all_targets():
    targets = preprocessing_targets()
    if DEMO:
        targets.append(f"{R}/cohort/subjects.tsv")
    return targets
