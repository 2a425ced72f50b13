"""Build a sample sheet from a public dataset layout.

* BraTS 2021 (and 2018-2020, same naming)::

      ROOT/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz

  ``seg`` becomes the ``label`` column; its values need the site's
  ``label_map`` :data:`BRATS_LABEL_MAP`.

* BIDS (anatomical images)::

      ROOT/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY][_entity-value...]_{T1w,T2w,FLAIR}.nii[.gz]
      ROOT/derivatives/PIPELINE/sub-XX[/ses-YY]/anat/..._dseg.nii[.gz]          (label, optional)
      ROOT/derivatives/PIPELINE/sub-XX[/ses-YY]/anat/..._desc-brain_mask.nii[.gz] (brain_mask, optional)

  One row per subject (``sub-XX``, from its first session with a T1w) or,
  with ``--sessions all``, per session (``sub-XX_ses-YY``). A T1w with a
  ``ce-`` entity goes to ``t1ce``. Among several runs / ``acq-`` variants the
  choice is deterministic (see :func:`ingest_bids`) and written to the
  ``session`` and ``bids_choice`` columns.

Command line::

    python -m brainsynth.ingest {brats,bids} ROOT -o SHEET.tsv [--site S] [--split train]
        [--derivative PIPELINE] [--sessions {first,all}] [--acq t1=mprage ...]
"""

import argparse
import csv
import logging
import re
import sys
from pathlib import Path

import pandas as pd

from .errors import InputError
from .sheet import SHEET_COLUMNS, SPLITS, write_sheet

log = logging.getLogger("brainsynth.ingest")

#: BraTS 2017-2021 segmentation values -> label schema classes (0 is background).
BRATS_LABEL_MAP = {1: "necrotic", 2: "oedema", 4: "enhancing"}

BRATS_SUFFIXES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "label"}
BIDS_SUFFIXES = {"T1w": "t1", "T2w": "t2", "FLAIR": "flair"}
NIFTI_EXTS = (".nii.gz", ".nii")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_root(root, kind):
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"{kind} root folder does not exist or is not a folder", file=root,
                         fix=f"pass the folder that holds the {kind} subject folders")
    return root.resolve()


def _check_split(split):
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}", field="split",
                         fix=f"use --split with one of: {', '.join(SPLITS)}")


def _sanitise_site(name):
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).lstrip("_.-")
    return s or "site"


def _check_site(site):
    if not _ID_RE.match(str(site)):
        raise InputError(f"site {site!r} has characters that are not allowed", field="site",
                         fix="use only letters, digits, '_', '.' and '-', starting with a letter or digit")


def _find_nifti(folder, stem):
    for ext in NIFTI_EXTS:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _frame(rows, extra=()):
    df = pd.DataFrame(rows, columns=SHEET_COLUMNS + list(extra)).astype(object)
    return df.where(df.notna(), None).reset_index(drop=True)


# --------------------------------------------------------------------------- BraTS
def ingest_brats(root, site="brats", split="train"):
    """Sample sheet rows for a BraTS 2021-style folder (one row per case)."""
    root = _check_root(root, "BraTS")
    _check_split(split)
    _check_site(site)
    rows = []
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        found = {col: _find_nifti(case, f"{case.name}_{suf}") for suf, col in BRATS_SUFFIXES.items()}
        if not any(found.values()):
            continue
        if found["t1"] is None:
            log.warning("BraTS case %s has no %s_t1.nii.gz; skipped", case.name, case.name)
            continue
        if not _ID_RE.match(case.name):
            raise InputError(f"case folder name {case.name!r} is not a valid subject id", subject=case.name,
                             file=case, fix="rename the folder using only letters, digits, '_', '.', '-'")
        row = {"subject": case.name, "site": site, "split": split}
        row.update({col: str(p) if p else None for col, p in found.items()})
        rows.append(row)
    if not rows:
        raise InputError(
            "no BraTS subjects found: looked for ROOT/<ID>/<ID>_t1.nii.gz "
            "(e.g. BraTS2021_00000/BraTS2021_00000_t1.nii.gz, also _t1ce, _t2, _flair, _seg)",
            file=root, fix="pass the folder that directly contains the BraTS2021_* case folders")
    return _frame(rows)


# --------------------------------------------------------------------------- BIDS
#: How :func:`ingest_bids` turns sessions into rows.
SESSION_MODES = ("first", "all")
#: Sheet columns :func:`ingest_bids` adds after :data:`SHEET_COLUMNS`.
BIDS_EXTRA_COLUMNS = ["session", "bids_choice"]
#: Image columns in the order they are filled and described in ``bids_choice``.
_BIDS_IMAGE_COLUMNS = ("t1", "t1ce", "t2", "flair")
#: Entities that do not count as "extra" when ranking candidates of one modality.
_RANKED_ENTITIES = ("ses", "acq", "ce", "run")
#: Entities that tie a derivative (label, brain mask) to one image: a derivative
#: naming one of them with a value other than the chosen T1w's is on another grid.
_T1_GRID_ENTITIES = ("acq", "ce", "rec", "run")
#: ``space-`` values meaning the subject's own T1w grid (no ``space-`` entity also does).
_NATIVE_SPACES = ("orig", "T1w")
#: ``--acq`` keys -> sheet column.
_ACQ_KEYS = {"t1": "t1", "t1w": "t1", "t1ce": "t1ce", "t2": "t2", "t2w": "t2", "flair": "flair"}


def _bids_parse(path, prefix):
    """(entities dict, suffix) of a BIDS file name starting with ``prefix``, or None."""
    name = path.name
    for ext in NIFTI_EXTS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    else:
        return None
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split("_")
    suffix = parts[-1]
    ents = {}
    for part in parts[:-1]:
        if "-" not in part:
            return None
        k, v = part.split("-", 1)
        ents[k] = v
    return ents, suffix


def _natural_key(text):
    """Sort key comparing digit runs by value: ses-2 < ses-10, ses-M12 < ses-M108."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)], text


def _run_key(ents):
    """Run order, lowest first: no run-, a non-numeric run label, run-1, run-2, ..., run-10."""
    v = ents.get("run")
    if v is None:
        return (0, 0, "")
    return (2, int(v), v) if v.isdigit() else (1, 0, v)


def _entities_text(ents, skip=("ses",)):
    """``acq-mprage_run-2`` (entities in file-name order), ``-`` for none."""
    return "_".join(f"{k}-{v}" for k, v in ents.items() if k not in skip) or "-"


def _check_sessions(sessions):
    if sessions not in SESSION_MODES:
        raise InputError(f"sessions {sessions!r} is not one of {', '.join(SESSION_MODES)}", field="sessions",
                         fix="use 'first' (one row per subject) or 'all' (one row per session)")


def _check_acq(acq):
    """{column: acq label} from a {modality: label} mapping (``t1``/``T1w``, ``acq-x``/``x``)."""
    out = {}
    for key, label in (acq or {}).items():
        col = _ACQ_KEYS.get(str(key).strip().lower())
        if col is None:
            raise InputError(f"acq preference for unknown modality {key!r}", field="acq",
                             fix="name one of t1, t1ce, t2, flair, e.g. --acq t1=mprage")
        label = str(label).strip()
        label = label[4:] if label.startswith("acq-") else label
        if not re.fullmatch(r"[A-Za-z0-9]+", label):
            raise InputError(f"acq label {label!r} for {col} is not a BIDS label", field="acq",
                             fix="give the value of the acq- entity, letters and digits only, "
                                 "e.g. --acq t1=mprage")
        out[col] = label
    return out


def _subdirs(folder, prefix):
    """Sub-folders of ``folder`` whose name starts with ``prefix`` (no dot-folders)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir()
            if p.name.startswith(prefix) and not p.name.startswith(".") and p.is_dir()]


def _anat_images(anat, prefix, subject):
    """{column: [(path, entities)]} of the T1w/T2w/FLAIR NIfTI files in one anat folder."""
    cands = {col: [] for col in _BIDS_IMAGE_COLUMNS}
    if not anat.is_dir():
        return cands
    for f in sorted(p for p in anat.iterdir() if p.name.startswith(prefix)):
        parsed = _bids_parse(f, prefix)
        if parsed is None or parsed[1] not in BIDS_SUFFIXES:
            continue
        if not f.is_file():
            if f.is_symlink():
                log.warning("%s: %s is a broken link (DataLad/git-annex content not fetched?); ignored "
                            "-- run 'datalad get' on it and ingest again", subject, f)
            continue
        ents, suffix = parsed
        col = BIDS_SUFFIXES[suffix]
        if col == "t1" and "ce" in ents:
            col = "t1ce"
        cands[col].append((f, ents))
    return cands


def _choose_image(cands, acq=None):
    """(path, entities, note) of the image chosen among one modality's candidates.

    1. acq: the candidates with ``acq-<acq>`` when ``acq`` is given and any has
       it; otherwise those without an acq- entity, else those with the first
       acq label in sorted order.
    2. the fewest entities other than ses-, acq-, ce-, run- (plain before
       rec-/echo-/part-... variants).
    3. the highest run number (no run- counts as lowest).
    4. the first file name in sorted order.
    """
    note = ""
    if acq is not None and any(e.get("acq") == acq for _, e in cands):
        cands = [c for c in cands if c[1].get("acq") == acq]
    else:
        if acq is not None:
            note = f"no acq-{acq}"
        first = min((e.get("acq") for _, e in cands), key=lambda a: (a is not None, a or ""))
        cands = [c for c in cands if c[1].get("acq") == first]
    extra = lambda e: sum(k not in _RANKED_ENTITIES for k in e)  # noqa: E731
    fewest = min(extra(e) for _, e in cands)
    cands = [c for c in cands if extra(c[1]) == fewest]
    top = max(_run_key(e) for _, e in cands)
    cands = [c for c in cands if _run_key(c[1]) == top]
    path, ents = min(cands, key=lambda c: c[0].name)
    return path, ents, note


def _choose_derivatives(pipelines, rel, prefix, t1_ents):
    """{"label": (path, pipeline, entities) or None, "brain_mask": ...} for one session.

    A ``*_dseg`` (label) or ``*_desc-brain_mask`` (brain_mask) is a candidate
    when it is on the chosen T1w's grid: no ``space-`` entity or ``space-orig``
    / ``space-T1w``, and every acq-/ce-/rec-/run- entity it has equals the
    chosen T1w's. Among candidates: fewest other entities, then most of those
    four entities matched, then the path (pipeline name first) in sorted order.
    """
    found = {"label": [], "brain_mask": []}
    for pipe in pipelines:
        danat = pipe / rel / "anat"
        if not danat.is_dir():
            continue
        for f in sorted(p for p in danat.iterdir() if p.name.startswith(prefix)):
            parsed = _bids_parse(f, prefix)
            if parsed is None or not f.is_file():
                continue
            ents, suffix = parsed
            if suffix == "dseg":
                col = "label"
            elif suffix == "mask" and ents.get("desc") == "brain":
                col = "brain_mask"
            else:
                continue
            if ents.get("space", "T1w") not in _NATIVE_SPACES:
                continue  # template grid
            if any(k in ents and ents[k] != t1_ents.get(k) for k in _T1_GRID_ENTITIES):
                continue  # belongs to another T1w (or to the t1ce)
            matched = sum(k in ents for k in _T1_GRID_ENTITIES)
            others = sum(k not in _T1_GRID_ENTITIES + ("ses", "space") for k in ents)
            found[col].append(((others, -matched, str(f)), f, pipe.name, ents))
    return {col: (min(c)[1:] if c else None) for col, c in found.items()}


def _bids_sites(root):
    """participant_id -> site from participants.tsv when it has a site column."""
    p = root / "participants.tsv"
    if not p.is_file():
        return {}
    with open(p, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    out = {}
    for r in rows:
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in r.items()}
        if r.get("participant_id") and r.get("site") and r["site"].lower() != "n/a":
            out[r["participant_id"]] = _sanitise_site(r["site"])
    return out


def _bids_row(row_id, ses, cands, derivs, acq):
    """One sheet row (without site/split) and its ``bids_choice`` text."""
    row = {"subject": row_id, "session": ses}
    choice = []
    t1_ents = {}
    for col in _BIDS_IMAGE_COLUMNS:
        cs = cands[col]
        if not cs:
            row[col] = None
            continue
        path, ents, note = _choose_image(cs, acq.get(col))
        if col == "t1":
            t1_ents = ents
        row[col] = str(path)
        more = ", ".join(([f"{len(cs)} candidates"] if len(cs) > 1 else []) + ([note] if note else []))
        more = f" ({more})" if more else ""
        choice.append(f"{col}={_entities_text(ents)}{more}")
        if len(cs) > 1:
            log.info("%s: %s %s chosen among %s", row_id, col, path.name,
                     ", ".join(sorted(c[0].name for c in cs)))
    for col, hit in derivs(t1_ents).items():
        row[col] = str(hit[0]) if hit else None
        if hit:
            choice.append(f"{col}={hit[1]}:{_entities_text(hit[2])}")
    row["bids_choice"] = "; ".join(choice)
    return row


def ingest_bids(root, site=None, split="train", derivative=None, sessions="first", acq=None):
    """Sample sheet rows for a BIDS dataset.

    Files looked at: ``ROOT/sub-<s>/[ses-<x>/]anat/sub-<s>[_ses-<x>]_*_{T1w,T2w,FLAIR}.nii[.gz]``
    (a T1w with a ``ce-`` entity is a ``t1ce``). When a subject has ``ses-*``
    folders only they are searched. Everything else is ignored: ``derivatives/``
    (except for labels, below), ``sourcedata/``, ``code/``, dot-files and
    dot-folders, JSON sidecars and other non-NIfTI files, files whose name does
    not start with their folder's ``sub-``/``ses-`` labels, broken links
    (DataLad content not fetched; warned). Images are not opened: a T2w or
    FLAIR on its own grid is kept as it is (the workflow registers it to the T1).

    Rows (``sessions``):

    * ``"first"`` (default): one row per subject, id ``sub-<s>``, from the
      first session that has a T1w, sessions sorted by label with digit runs
      compared by value (ses-2 before ses-10, ses-M12 before ses-M108). All
      modalities come from that session; a modality it lacks stays empty
      (never taken from another session).
    * ``"all"``: one row per session that has a T1w, id ``sub-<s>_ses-<x>``.

    A subject without a T1w in any session is skipped with a warning in the
    log; a subject folder name that is not a valid id is an error.

    Image of each modality within the session (deterministic; ``acq`` is an
    optional ``{modality: acq label}`` preference, e.g. ``{"t1": "mprage"}``):

    1. acq: the files with the preferred ``acq-`` label if any has it;
       otherwise the files without an ``acq-`` entity, else the first acq
       label in sorted order (``acq-fspgr`` before ``acq-mprage``).
    2. fewest entities besides ses-/acq-/ce-/run- (plain before rec-/echo-/part-).
    3. the highest run number: a run is usually repeated because the earlier
       one failed (motion), and BIDS numbers runs in acquisition order. A file
       without run- counts as the lowest run.
    4. the first file name in sorted order (``.nii`` before ``.nii.gz``).

    ``label`` / ``brain_mask`` come from ``ROOT/derivatives/<pipeline>/`` (only
    ``<derivative>`` when given) at the chosen session's path: ``*_dseg`` and
    ``*_desc-brain_mask`` files on the chosen T1w's grid only, i.e. without a
    template ``space-`` (``space-orig``/``space-T1w`` are fine) and with any
    ``acq-``/``ce-``/``rec-``/``run-`` equal to the chosen T1w's; then the
    fewest other entities, then the sorted path.

    Columns: :data:`SHEET_COLUMNS`, then ``session`` (``ses-<x>``, empty
    without sessions) and ``bids_choice``, what was picked per column, e.g.
    ``t1=acq-mprage_run-2 (4 candidates); flair=-; label=fmriprep:desc-aseg``
    (entities besides sub/ses; ``-`` for none; candidates counted when more
    than one; ``no acq-X`` when the preferred acq label was absent).

    ``site`` defaults to the ``site`` column of participants.tsv, else the
    root folder's name.
    """
    root = _check_root(root, "BIDS")
    _check_split(split)
    _check_sessions(sessions)
    acq = _check_acq(acq)
    if site is not None:
        _check_site(site)
    sites = _bids_sites(root) if site is None else {}
    default_site = site or _sanitise_site(root.name)
    deriv_root = root / "derivatives"
    if derivative is not None:
        pipelines = [deriv_root / derivative]
        if not pipelines[0].is_dir():
            known = ", ".join(sorted(p.name for p in _subdirs(deriv_root, ""))) or "(none)"
            raise InputError(f"derivatives pipeline {derivative!r} not found", file=pipelines[0],
                             fix=f"use one of: {known}")
    else:
        pipelines = sorted(_subdirs(deriv_root, ""))

    rows = []
    for sub in sorted(_subdirs(root, "sub-")):
        if not _ID_RE.match(sub.name):
            raise InputError(f"subject folder name {sub.name!r} is not a valid subject id", subject=sub.name,
                             file=sub, fix="rename the folder to sub-<label> with letters and digits only, "
                                           "or move it out of the dataset")
        ses_dirs = sorted(_subdirs(sub, "ses-"), key=lambda p: _natural_key(p.name))
        units = [(s.name, Path(sub.name) / s.name) for s in ses_dirs] or [(None, Path(sub.name))]
        made = 0
        for ses, rel in units:
            prefix = f"{sub.name}_{ses}_" if ses else f"{sub.name}_"
            cands = _anat_images(root / rel / "anat", prefix, sub.name)
            if not cands["t1"]:
                if any(cands.values()) and ses:
                    (log.warning if sessions == "all" else log.info)(
                        "%s %s has no T1w image in %s; %s", sub.name, ses, root / rel / "anat",
                        "skipped" if sessions == "all" else "trying the next session")
                continue
            row_id = prefix[:-1] if sessions == "all" else sub.name
            if not _ID_RE.match(row_id):
                raise InputError(f"session folder name {ses!r} makes an invalid subject id {row_id!r}",
                                 subject=row_id, file=root / rel,
                                 fix="rename the folder to ses-<label> with letters and digits only")
            row = _bids_row(row_id, ses, cands, acq=acq,
                            derivs=lambda t1: _choose_derivatives(pipelines, rel, prefix, t1))
            row.update(site=sites.get(sub.name, default_site), split=split)
            rows.append(row)
            made += 1
            if sessions == "first":
                break
        if not made:
            where = ", ".join(str(Path(rel) / "anat") for _, rel in units)
            log.warning("%s has no T1w image (looked in %s); skipped", sub.name, where)
    if not rows:
        raise InputError(
            "no BIDS subjects with a T1w image found: looked for "
            "ROOT/sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_T1w.nii[.gz]",
            file=root, fix="pass the BIDS dataset root (the folder holding the sub-* folders)")
    return _frame(rows, BIDS_EXTRA_COLUMNS)


# --------------------------------------------------------------------------- CLI
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m brainsynth.ingest",
                                     description="Write a sample sheet (TSV) for a BraTS or BIDS dataset.")
    parser.add_argument("layout", choices=["brats", "bids"], help="dataset layout")
    parser.add_argument("root", help="dataset root folder")
    parser.add_argument("-o", "--output", required=True, help="sample sheet to write (TSV)")
    parser.add_argument("--site", default=None,
                        help="site name for every row (default: 'brats'; BIDS: participants.tsv site or root name)")
    parser.add_argument("--split", default="train", choices=list(SPLITS), help="split for every row")
    parser.add_argument("--derivative", default=None, help="BIDS: derivatives pipeline holding *_dseg labels")
    parser.add_argument("--sessions", default="first", choices=list(SESSION_MODES),
                        help="BIDS: one row per subject from its first session with a T1w (first), "
                             "or one row per session (all)")
    parser.add_argument("--acq", action="append", default=[], metavar="MODALITY=LABEL",
                        help="BIDS: preferred acq- label of a modality (t1, t1ce, t2, flair), e.g. "
                             "--acq t1=mprage; repeat for several modalities")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.layout == "brats":
            df = ingest_brats(args.root, site=args.site or "brats", split=args.split)
        else:
            acq = {}
            for item in args.acq:
                key, sep, label = item.partition("=")
                if not sep:
                    raise InputError(f"--acq {item!r} is not MODALITY=LABEL", field="acq",
                                     fix="write it like --acq t1=mprage")
                acq[key] = label
            df = ingest_bids(args.root, site=args.site, split=args.split, derivative=args.derivative,
                             sessions=args.sessions, acq=acq)
        write_sheet(df, args.output)
    except InputError as exc:
        sys.stderr.write(f"ERROR: {exc}\n")
        return 1
    log.info("wrote %d subjects to %s", len(df), args.output)
    if args.layout == "brats" and df["label"].notna().any():
        sites = sorted(df["site"].unique())
        log.info("BraTS labels need a label_map in config for site(s) %s: {1: necrotic, 2: oedema, 4: enhancing}",
                 ", ".join(sites))
    return 0


if __name__ == "__main__":
    sys.exit(main())
