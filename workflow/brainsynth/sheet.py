"""The subject sample sheet: a tab-separated table, one row per subject.

Columns (see ``config/schemas/subjects.schema.yaml``):

``subject``  unique id, letters/digits/``_.-`` (used in file names and wildcards)
``site``     acquisition site; selects the site's ``label_map``
``split``    ``train``, ``val`` or ``test``
``t1``       T1-weighted NIfTI (the reference grid)
``t2``, ``flair``, ``t1ce``   further modalities (optional unless in config ``modalities``)
``label``    label map NIfTI (optional)
``brain_mask``  brain mask NIfTI (optional)

Every subject needs every modality of config ``modalities``, unless its site is listed in
config ``site_modalities`` (e.g. a T1-only or a FLAIR-only dataset): then it needs exactly
those (:func:`site_modalities_of`); its first one anchors preprocessing when it has no T1
(:func:`anchor_modality`).

Any other column is kept as metadata. Empty cells mean "not available".
Relative paths are relative to the sheet's directory. Lines starting with
``#`` and blank lines are ignored.

:func:`load_sheet` reports every problem of the sheet at once as
:class:`~brainsynth.errors.InputErrors`.
"""

import csv
import os
from pathlib import Path

import pandas as pd
import yaml

from .errors import InputError, InputErrors
from .io import save_table

ID_COLUMNS = ["subject", "site", "split"]
IMAGE_COLUMNS = ["t1", "t2", "flair", "t1ce"]
PATH_COLUMNS = IMAGE_COLUMNS + ["label", "brain_mask"]
SHEET_COLUMNS = ID_COLUMNS + PATH_COLUMNS
REQUIRED_COLUMNS = ["subject", "site", "split", "t1"]
SPLITS = ("train", "val", "test")

DEFAULT_SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schemas" / "subjects.schema.yaml"

_ID_FIX = "use only letters, digits, '_', '.' and '-', starting with a letter or digit"


def load_schema(schema_path=None):
    """The row JSON schema as a dict (default: config/schemas/subjects.schema.yaml)."""
    path = Path(schema_path) if schema_path is not None else DEFAULT_SCHEMA
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise InputError("sample sheet schema not found", file=path,
                         fix="pass schema_path= pointing to config/schemas/subjects.schema.yaml") from None


def site_modalities_of(site, modalities, site_modalities=None):
    """The modalities a site delivers, in run order: its ``site_modalities`` entry, else every
    modality of the run (config ``modalities``)."""
    listed = (site_modalities or {}).get(str(site))
    return list(modalities) if listed is None else [m for m in modalities if m in listed]


def anchor_modality(modalities):
    """The modality a subject's preprocessing is anchored on (co-registration target, template
    registration, skull stripping): its T1, else its first modality (a FLAIR-only dataset)."""
    return "t1" if "t1" in modalities else list(modalities)[0]


def check_site_modalities(site_modalities, modalities, sites):
    """``site_modalities`` (site -> modalities it delivers) against the run's modalities and the
    subject table's sites; InputError naming the site and the fix."""
    for site, mods in (site_modalities or {}).items():
        field = f"site_modalities.{site}"
        if str(site) not in {str(s) for s in sites}:
            raise InputError(f"no subject has site {site!r}", field=field,
                             fix=f"name one of the sites {sorted({str(s) for s in sites})} or drop the entry")
        if not isinstance(mods, list) or not mods:
            raise InputError(f"must be a non-empty list of modalities, got {mods!r}", field=field,
                             fix="e.g. [t1] for a T1-only dataset")
        unknown = [m for m in mods if m not in modalities]
        if unknown:
            raise InputError(f"{unknown} are not modalities of the run {list(modalities)}", field=field,
                             fix="list modalities of config 'modalities' (add them there first)")


def _read_rows(path):
    """Yield (line_number, cells) of non-blank, non-comment lines."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for cells in reader:
            line = reader.line_num
            if not cells or all(c.strip() == "" for c in cells):
                continue
            if cells[0].lstrip().startswith("#"):
                continue
            yield line, cells


def _row_error(err, *, row, line, subject, sheet):
    """Turn one jsonschema ValidationError into an InputError."""
    where = f"row {row} (line {line})"
    if err.validator == "required":
        col = err.message.split("'")[1] if "'" in err.message else "?"
        return InputError(f"{where}: required column {col!r} is empty", subject=subject, file=sheet,
                          field=col, fix=f"fill in {col!r} for this subject or delete the row")
    col = err.path[0] if err.path else None
    value = err.instance
    if err.validator == "enum":
        allowed = ", ".join(map(str, err.validator_value))
        return InputError(f"{where}: {col} {value!r} is not one of {allowed}", subject=subject, file=sheet,
                          field=col, fix=f"set {col!r} to one of: {allowed}")
    if err.validator == "pattern":
        return InputError(f"{where}: {col} {value!r} has characters that are not allowed", subject=subject,
                          file=sheet, field=col, fix=_ID_FIX)
    if err.validator in ("minLength",):
        return InputError(f"{where}: {col} is empty", subject=subject, file=sheet, field=col,
                          fix=f"fill in {col!r}")
    return InputError(f"{where}: {err.message}", subject=subject, file=sheet, field=col,
                      fix="correct the value (see config/schemas/subjects.schema.yaml)")


def _resolve(value, base):
    p = os.path.expanduser(value)
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(p)


def load_sheet(path, modalities=("t1",), schema_path=None, site_modalities=None):
    """Read, validate and normalise the sample sheet at ``path``.

    Returns a DataFrame indexed by subject id (index name ``None``, the
    ``subject`` column is kept) with at least the columns of
    :data:`SHEET_COLUMNS` (missing optional ones added, empty), then any extra
    columns. All values are ``str``; empty cells are ``None``. Paths in
    :data:`PATH_COLUMNS` and in ``modalities`` are absolute.

    Raises :class:`InputErrors` listing every problem: rows failing the JSON
    schema (row number, subject, column), duplicate subject ids, columns of the
    config ``modalities`` missing from the sheet or empty for a subject (for a subject of a site
    in ``site_modalities``: that site's modalities, :func:`site_modalities_of`).
    """
    sheet = Path(path)
    modalities = list(modalities or [])
    if not sheet.is_file():
        raise InputErrors([InputError("sample sheet not found", file=sheet, field="samples",
                                      fix="set config 'samples' to an existing TSV file, or null for the demo cohort")])
    schema = load_schema(schema_path)
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = validator_cls(schema)

    rows = list(_read_rows(sheet))
    if not rows:
        raise InputErrors([InputError("sample sheet is empty (no header line)", file=sheet,
                                      fix=f"add a tab-separated header line: {' '.join(SHEET_COLUMNS)}")])
    header_line, header = rows[0]
    header = [h.strip().lower() for h in header]
    errors = []
    if len(header) == 1 and "," in header[0]:
        raise InputErrors([InputError("the header has no tab characters; the sheet looks comma-separated",
                                      file=sheet, fix="save the sample sheet as tab-separated values (TSV)")])
    seen = set()
    for h in header:
        if h == "":
            errors.append(InputError(f"line {header_line}: a header cell is empty", file=sheet,
                                     fix="name every column or delete the empty column"))
        elif h in seen:
            errors.append(InputError(f"line {header_line}: column {h!r} appears twice in the header",
                                     file=sheet, field=h, fix="keep one column of that name"))
        seen.add(h)
    for col in REQUIRED_COLUMNS:
        if col not in header:
            errors.append(InputError(f"required column {col!r} is missing from the header", file=sheet,
                                     field=col, fix=f"add a {col!r} column"))
    for mod in modalities:
        if mod not in header and mod not in REQUIRED_COLUMNS:
            errors.append(InputError(
                f"modality {mod!r} is listed in config 'modalities' but the sheet has no {mod!r} column",
                file=sheet, field=mod,
                fix=f"add a {mod!r} column with one image per subject, or remove {mod!r} from config 'modalities'"))
    if errors:
        # Row checks would only repeat the header problems.
        raise InputErrors(errors)

    base = str(sheet.resolve().parent)
    path_cols = [c for c in header if c in PATH_COLUMNS or c in modalities]
    records = []
    first_row = {}
    for n, (line, cells) in enumerate(rows[1:], start=1):
        cells = [c.strip() for c in cells]
        si = header.index("subject")
        subject = cells[si] if len(cells) > si else ""
        label = subject if subject else f"<row {n}>"
        if len(cells) > len(header):
            if any(cells[len(header):]):
                errors.append(InputError(
                    f"row {n} (line {line}) has {len(cells)} fields but the header has {len(header)}",
                    subject=label, file=sheet,
                    fix="remove the extra tab-separated values or add a column name to the header"))
                continue
            cells = cells[: len(header)]
        cells = cells + [""] * (len(header) - len(cells))
        rec = {h: (v if v != "" else None) for h, v in zip(header, cells)}
        for err in sorted(validator.iter_errors({k: v for k, v in rec.items() if v is not None}),
                          key=lambda e: list(e.path)):
            errors.append(_row_error(err, row=n, line=line, subject=label, sheet=sheet))
        site = rec.get("site")
        listed = site is not None and str(site) in (site_modalities or {})
        for mod in site_modalities_of(site, modalities, site_modalities):
            if rec.get(mod) is None:
                errors.append(InputError(
                    f"row {n} (line {line}): no {mod!r} image, but "
                    + (f"site_modalities.{site} lists {mod!r}" if listed
                       else f"{mod!r} is in config 'modalities'"),
                    subject=label, file=sheet, field=mod,
                    fix=f"fill in the {mod!r} path, delete the subject, or "
                        + (f"drop {mod!r} from site_modalities.{site}" if listed
                           else f"list the modalities site {site!r} delivers under config 'site_modalities' "
                                f"(e.g. {{{site}: [t1]}}), or remove {mod!r} from config 'modalities'")))
        if subject:
            if subject in first_row:
                n0, line0 = first_row[subject]
                errors.append(InputError(
                    f"duplicate subject id: rows {n0} (line {line0}) and {n} (line {line}) both use {subject!r}",
                    subject=subject, file=sheet, field="subject",
                    fix="give every row a unique subject id (e.g. append _ses-02 for a second session) "
                        "or delete the duplicate row"))
            else:
                first_row[subject] = (n, line)
        for c in path_cols:
            if rec.get(c) is not None:
                rec[c] = _resolve(rec[c], base)
        records.append(rec)
    if not records and not errors:
        errors.append(InputError("sample sheet has a header but no subjects", file=sheet,
                                 fix="add one tab-separated row per subject"))
    if errors:
        raise InputErrors(errors)

    df = pd.DataFrame.from_records(records, columns=header).astype(object)
    df = df.where(df.notna(), None)
    for c in SHEET_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[SHEET_COLUMNS + [c for c in df.columns if c not in SHEET_COLUMNS]]
    df.index = pd.Index(df["subject"].tolist())
    return df


def write_sheet(df, path):
    """Write a sample sheet atomically: standard columns first, empty cells for None."""
    df = df.copy()
    for c in SHEET_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[SHEET_COLUMNS + [c for c in df.columns if c not in SHEET_COLUMNS]]
    df = df.astype(object).where(df.notna(), "")
    return save_table(df, path)
