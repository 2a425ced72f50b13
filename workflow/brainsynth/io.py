"""Atomic output writing and the entry point wrapper used by rule scripts.

Outputs are written to a temporary file in the destination directory and moved
into place with :func:`os.replace`, so a killed job never leaves a file that
looks complete.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError

log = logging.getLogger("brainsynth")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; move it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def save_nifti(array, affine, path, dtype=None, header=None):
    """Write ``array`` as NIfTI atomically; ``dtype`` defaults to the array's."""
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    img = nib.Nifti1Image(arr, affine, header=header)
    img.set_data_dtype(arr.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_table(df, path, **kwargs):
    """Write a pandas DataFrame as TSV atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, **kwargs)
    return Path(path)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def save_figure(fig, path, **kwargs):
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    plt.close(fig)
    return Path(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def setup_logging(log_file=None, level=logging.INFO):
    """Log to stderr and, when given, to the rule's log file."""
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def run_main(func, snakemake_obj=None):
    """Run a rule script's ``func(snakemake)``; user errors end with a clear message.

    An :class:`InputError` is printed as one line (no traceback) and the
    process exits 1, so Snakemake marks the job failed and removes its outputs.
    """
    log_file = None
    if snakemake_obj is not None and len(snakemake_obj.log):
        log_file = str(snakemake_obj.log[0])
    setup_logging(log_file)
    try:
        func(snakemake_obj)
    except InputError as exc:
        log.error("%s", exc)
        sys.stderr.write(f"ERROR: {exc}\n")
        sys.exit(1)
