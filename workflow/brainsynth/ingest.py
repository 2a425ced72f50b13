"""Build a sample sheet from a public dataset layout.

* BraTS 2021 (and 2018-2020, same naming)::

      ROOT/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz

  ``seg`` becomes the ``label`` column; its values need the site's
  ``label_map`` :data:`BRATS_LABEL_MAP`.

* BIDS (anatomical images)::

      ROOT/sub-XX[/ses-YY]/anat/sub-XX[_ses-YY][_entity-value...]_{T1w,T2w,FLAIR}.nii[.gz]
      ROOT/derivatives/PIPELINE/sub-XX[/ses-YY]/anat/..._dseg.nii[.gz]          (label, optional)
      ROOT/derivatives/PIPELINE/sub-XX[/ses-YY]/anat/..._desc-brain_mask.nii[.gz] (brain_mask, optional)

  One row per subject (``sub-XX``) or per session (``sub-XX_ses-YY``). A
  T1w with a ``ce-`` entity goes to ``t1ce``.

Command line::

    python -m brainsynth.ingest {brats,bids} ROOT -o SHEET.tsv [--site S] [--split train]
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


def _frame(rows):
    df = pd.DataFrame(rows, columns=SHEET_COLUMNS).astype(object)
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


def _pick(cands, what, subject):
    """Prefer the candidate with the fewest extra entities, then the first by name."""
    if not cands:
        return None
    cands = sorted(cands, key=lambda c: (len(c[1]), str(c[0])))
    if len(cands) > 1:
        log.warning("%s: %d candidate %s files, using %s (ignoring %s)", subject, len(cands), what,
                    cands[0][0].name, ", ".join(c[0].name for c in cands[1:]))
    return cands[0][0]


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


def ingest_bids(root, site=None, split="train", derivative=None):
    """Sample sheet rows for a BIDS dataset (one row per subject or subject_session).

    ``site`` defaults to the ``site`` column of participants.tsv, else the
    root folder's name. ``derivative`` restricts label/brain-mask lookup to
    ``ROOT/derivatives/<derivative>``; by default every pipeline is searched.
    """
    root = _check_root(root, "BIDS")
    _check_split(split)
    if site is not None:
        _check_site(site)
    sites = _bids_sites(root) if site is None else {}
    default_site = site or _sanitise_site(root.name)
    deriv_root = root / "derivatives"
    if derivative is not None:
        pipelines = [deriv_root / derivative]
        if not pipelines[0].is_dir():
            raise InputError(f"derivatives pipeline {derivative!r} not found", file=pipelines[0],
                             fix=f"use one of: {', '.join(sorted(p.name for p in deriv_root.glob('*') if p.is_dir())) or '(none)'}")
    else:
        pipelines = sorted(p for p in deriv_root.glob("*") if p.is_dir()) if deriv_root.is_dir() else []

    rows = []
    for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir())
        units = [(f"{sub.name}_{s.name}", Path(sub.name) / s.name) for s in sessions] or [(sub.name, Path(sub.name))]
        for subject, rel in units:
            prefix = subject + "_"
            cands = {col: [] for col in ("t1", "t1ce", "t2", "flair")}
            anat = root / rel / "anat"
            for f in sorted(anat.glob(prefix + "*")) if anat.is_dir() else []:
                parsed = _bids_parse(f, prefix)
                if parsed is None or parsed[1] not in BIDS_SUFFIXES:
                    continue
                ents, suffix = parsed
                col = BIDS_SUFFIXES[suffix]
                if col == "t1" and "ce" in ents:
                    col = "t1ce"
                cands[col].append((f, ents))
            if not cands["t1"]:
                if any(cands.values()):
                    log.warning("%s has no T1w image in %s; skipped", subject, anat)
                continue
            labels, masks = [], []
            for pipe in pipelines:
                danat = pipe / rel / "anat"
                if not danat.is_dir():
                    continue
                for f in sorted(danat.glob(prefix + "*")):
                    parsed = _bids_parse(f, prefix)
                    if parsed is None:
                        continue
                    ents, suffix = parsed
                    # Native-space files first: a space- entity usually means a template grid.
                    rank = {k: v for k, v in ents.items() if not (k == "space" and v in ("orig", "T1w"))}
                    if suffix == "dseg":
                        labels.append((f, rank))
                    elif suffix == "mask" and ents.get("desc") == "brain":
                        masks.append((f, rank))
            row = {"subject": subject, "site": sites.get(sub.name, default_site), "split": split}
            for col, cs in cands.items():
                p = _pick(cs, col, subject)
                row[col] = str(p) if p else None
            lab = _pick(labels, "dseg", subject)
            msk = _pick(masks, "brain mask", subject)
            row["label"] = str(lab) if lab else None
            row["brain_mask"] = str(msk) if msk else None
            rows.append(row)
    if not rows:
        raise InputError(
            "no BIDS subjects with a T1w image found: looked for "
            "ROOT/sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>]_T1w.nii[.gz]",
            file=root, fix="pass the BIDS dataset root (the folder holding the sub-* folders)")
    return _frame(rows)


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.layout == "brats":
            df = ingest_brats(args.root, site=args.site or "brats", split=args.split)
        else:
            df = ingest_bids(args.root, site=args.site, split=args.split, derivative=args.derivative)
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
