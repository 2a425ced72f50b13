"""Integrity checks of the workflow's intermediate files.

Every rule writes its outputs atomically (:func:`brainsynth.io.atomic_path`), so a
killed job never leaves a file that looks complete. A file can still be damaged
afterwards (a full disk during a copy, a bad sync, a user's editor); Snakemake
only compares modification times and, for files under 1 MB, checksums recorded
when the consuming job ran, so it would hand a damaged file to the next job.

Before a rule script runs, :func:`brainsynth.io.run_main` therefore checks each of
the job's input files that the workflow itself made (under ``results/``) with
:func:`check_file`:

``.nii.gz``  the whole gzip stream is decompressed to its end (CRC-32 and length
             trailer), the NIfTI header parses, the data block is as long as the
             header's shape and data type say, the affine is finite;
``.nii``     header and data length;
``.json``    parses;
``.tsv`` / ``.csv``  UTF-8, ends with a newline, every row has the header's
             number of fields;
``.mat``     ITK/ANTs affine transform (MATLAB v4): loads, finite parameters;
``.pt`` / ``.pth`` / ``.npz``  zip archive with every member's CRC intact;
``.png``     PNG signature and final IEND chunk;

and any other file: not empty. A damaged file is moved aside to
``<file>.corrupt`` (kept as evidence; a file inside a rule's folder output, such
as one preprocessed subject, moves the whole folder aside) and the job stops with an
:class:`~brainsynth.errors.InputError` naming it. The next ``snakemake`` run finds
the file missing and rebuilds it with the rule that makes it, then reruns what
depends on it.

A file damaged *without* a newer modification time is not rerun by Snakemake, so
nothing reads it until something else changes. ``python -m brainsynth.integrity
results/<experiment>`` checks every file under a folder the same way and moves
damaged ones aside, so that the next run rebuilds them.
"""

import argparse
import csv
import gzip
import io
import json
import os
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

from .errors import InputError, InputErrors

CORRUPT_SUFFIX = ".corrupt"
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"
#: Folder (relative to the working directory) holding everything the workflow makes.
RESULTS_ROOT = "results"
_CHUNK = 1 << 20


class CorruptFile(InputError):
    """An intermediate file failed its integrity check (and was moved aside)."""


def _gzip_payload_size(path):
    """Decompress a gzip file to its end (zlib checks CRC-32 and length); return the byte count."""
    n = 0
    with gzip.open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                return n
            n += len(block)


def _check_nifti(path, gz):
    import nibabel as nib
    import numpy as np

    try:
        payload = _gzip_payload_size(path) if gz else os.path.getsize(path)
    except (EOFError, OSError, zlib.error) as exc:  # truncated / garbled gzip (BadGzipFile is an OSError)
        return f"damaged gzip stream ({exc})"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)  # NIfTI-2 header size; NIfTI-1 uses the first 348 bytes
        sizeof_hdr = struct.unpack("<i", head[:4])[0]
        klass = nib.Nifti2Header if sizeof_hdr in (540, 0x1C020000) else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(head), check=True)
    except Exception as exc:  # nibabel raises several types for a bad header
        return f"not a readable NIfTI header ({exc})"
    shape = header.get_data_shape()
    if not shape or any(int(s) < 1 for s in shape):
        return f"NIfTI header gives an empty shape {tuple(shape)}"
    need = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if payload < need:
        return f"data block too short: {payload} bytes, header needs {need}"
    if not np.all(np.isfinite(header.get_best_affine())):
        return "affine has non-finite values"
    return None


def _check_json(path):
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not valid JSON ({exc})"
    return None


def _check_table(path, delimiter):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc})"
    if not text.endswith("\n"):
        return "does not end with a newline (truncated)"
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    if not rows or not any(rows[0]):
        return "no header line"
    width = len(rows[0])
    for n, row in enumerate(rows[1:], start=2):
        if row and len(row) != width:
            return f"line {n} has {len(row)} fields, the header {width}"
    return None


def _check_mat(path):
    import numpy as np
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError/TypeError/... on damage
        return f"not a readable transform file ({exc})"
    arrays = [v for k, v in data.items() if not k.startswith("__")]
    if not arrays:
        return "transform file holds no parameters"
    for v in arrays:
        if not np.all(np.isfinite(np.asarray(v, dtype=float))):
            return "transform has non-finite parameters"
    return None


def _check_zip(path):
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        return f"damaged zip archive ({exc})"
    return f"damaged zip member {bad!r}" if bad else None


def _check_png(path):
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(max(0, os.path.getsize(path) - 12))
        tail = fh.read(12)
    if head != b"\x89PNG\r\n\x1a\n":
        return "no PNG signature"
    if tail[4:8] != b"IEND":
        return "no final IEND chunk (truncated)"
    return None


def check_file(path):
    """``None`` when ``path`` passes its check (see the module doc), else what is wrong."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if size == 0:
        return "empty file"
    name = os.path.basename(path).lower()
    try:
        if name.endswith(".nii.gz"):
            return _check_nifti(path, gz=True)
        if name.endswith(".nii"):
            return _check_nifti(path, gz=False)
        if name.endswith(".json"):
            return _check_json(path)
        if name.endswith(".tsv"):
            return _check_table(path, "\t")
        if name.endswith(".csv"):
            return _check_table(path, ",")
        if name.endswith(".mat"):
            return _check_mat(path)
        if name.endswith((".pt", ".pth", ".npz")):
            return _check_zip(path)
        if name.endswith(".png"):
            return _check_png(path)
        if name.endswith(".gz"):
            _gzip_payload_size(path)
    except (EOFError, OSError, zlib.error) as exc:
        return f"cannot be read to its end ({exc})"
    return None


def is_intermediate(path, root=RESULTS_ROOT):
    """True for files under ``<cwd>/<root>`` (what the workflow makes; never the user's data)."""
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == base or real.startswith(base + os.sep)


def move_aside(path):
    """Rename a damaged file or folder to ``<path>.corrupt`` (replacing an older one); return the new path."""
    dst = f"{path}{CORRUPT_SUFFIX}"
    if os.path.isdir(path) and os.path.lexists(dst):
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        else:
            os.remove(dst)
    os.replace(path, dst)
    return dst


def output_folder(path, root=RESULTS_ROOT):
    """The folder output of a rule that holds ``path`` (Snakemake marks those with a
    ``.snakemake_timestamp`` file), or None.

    Snakemake tracks such a folder as a whole, so a damaged file in it is dealt
    with by moving the whole folder aside: the next run then rebuilds it.
    """
    base = os.path.realpath(root)
    d = os.path.dirname(os.path.realpath(path))
    while d.startswith(base + os.sep):
        if os.path.exists(os.path.join(d, SNAKEMAKE_TIMESTAMP)):
            return d
        d = os.path.dirname(d)
    return None


def _fix(moved):
    return (f"it was moved aside to {moved}; run snakemake again: the rule that makes it rebuilds it "
            "and reruns what depends on it")


def verify_inputs(paths, root=RESULTS_ROOT, move=True):
    """Check every existing intermediate file in ``paths``; raise :class:`CorruptFile` naming the damaged ones.

    Damaged files are moved aside to ``<file>.corrupt`` first (``move``), so the
    next Snakemake run rebuilds them. Directories and files outside ``root`` are
    skipped (the user's data is checked by the ``validate_inputs`` rule and never
    moved). An intermediate that is missing (Snakemake saw it when it started the
    job, so a parallel job found it damaged and moved it aside) is reported too.
    Returns the files checked.
    """
    errors, checked = [], []
    for p in dict.fromkeys(str(p) for p in paths):
        if os.path.isdir(p) or not is_intermediate(p, root):
            continue
        real = os.path.realpath(p)
        if os.path.exists(real):
            checked.append(p)
            problem = check_file(real)
        elif output_folder(real, root) is not None:
            # a file gone from a folder output: Snakemake would not notice, so rebuild the folder
            problem = "missing from its folder"
        else:
            aside = f"{real}{CORRUPT_SUFFIX}"
            why = (f"found damaged by another job and moved aside to {aside}" if os.path.exists(aside)
                   else "removed while the job was starting")
            errors.append(CorruptFile(f"input file is missing: {why}", file=p,
                                      fix="run snakemake again: the rule that makes it rebuilds it"))
            continue
        if problem is None:
            continue
        target = output_folder(real, root) or real
        try:
            moved = move_aside(target) if move else None
        except FileNotFoundError:  # a parallel job moved it first
            moved = f"{target}{CORRUPT_SUFFIX}"
        errors.append(CorruptFile(f"damaged intermediate file: {problem}", file=p,
                                  fix=_fix(moved) if moved else "delete it and run snakemake again"))
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise InputErrors(errors)
    return checked


def scan(folder, move=True):
    """Check every file under ``folder``; return ``[(path, problem, moved_to)]`` of damaged ones."""
    found = []
    root = os.path.dirname(os.path.realpath(folder))
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(CORRUPT_SUFFIX)]
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if (name.endswith(CORRUPT_SUFFIX) or name.startswith(".") or os.path.islink(p)
                    or not os.path.exists(p)):  # (inside a folder just moved aside)
                continue
            problem = check_file(p)
            if problem:
                found.append((p, problem, move_aside(output_folder(p, root) or p) if move else None))
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m brainsynth.integrity",
                                 description="Check intermediate files; move damaged ones aside for a rebuild.")
    ap.add_argument("folders", nargs="+", help="e.g. results/demo")
    ap.add_argument("--dry-run", action="store_true", help="only report, move nothing")
    a = ap.parse_args(argv)
    found = [f for folder in a.folders for f in scan(folder, move=not a.dry_run)]
    for path, problem, moved in found:
        print(f"{path}: {problem}" + (f" -> moved to {moved}" if moved else ""))
    if found and not a.dry_run:
        print(f"{len(found)} damaged file(s) moved aside; run snakemake again to rebuild them")
    elif not found:
        print("no damaged files")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
