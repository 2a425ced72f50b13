"""Model files are data, not code: saving and loading them with ``weights_only=True``.

A model file shared by another lab is loaded like any input: torch's
``weights_only`` unpickler rebuilds tensors and plain data only, so a crafted file
cannot run code; what our trainers save is reduced to such data first
(:func:`plain_data`), so every file they write loads under the same rule. Shared by
the generators and the segmentation stage.
"""

import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .io import atomic_path


# what torch.load(weights_only=True) rebuilds without an allow-list
_PLAIN_LEAVES = (str, bytes, bytearray, bool, int, float, complex, type(None), torch.Tensor, torch.Size,
                 torch.dtype, torch.device)


def plain_data(obj, where="payload"):
    """``obj`` as data that loads with ``weights_only=True``: numpy arrays become tensors,
    numpy scalars python numbers, paths strings; any other object raises ``TypeError``
    now rather than making a file our loader refuses later."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where}: numpy object array cannot be saved as data")
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        pairs = [(plain_data(k, where), plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        same = all(a is k and b is v for (a, b), (k, v) in zip(pairs, obj.items()))
        if same and type(obj) in (dict, OrderedDict):
            return obj  # unchanged (keeps a state dict's _metadata)
        return OrderedDict(pairs) if isinstance(obj, OrderedDict) else dict(pairs)
    if isinstance(obj, (list, tuple, set)):
        items = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(items) if type(obj) in (list, tuple, set) else list(items)
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain data "
                    "(tensors, numbers, strings, lists, tuples, dicts); model files must load with "
                    "torch.load(weights_only=True)")


def torch_save(obj, path):
    """``torch.save`` of :func:`plain_data` through a temporary file and ``os.replace``
    (never a half-written file).

    Written through a file object: given a path, torch names the archive's root folder
    after the (random) temporary file name, so the same weights gave different bytes."""
    obj = plain_data(obj)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
    return Path(path)


def _load_failure(path, exc):
    """One line on why ``torch.load(weights_only=True)`` failed: the refused types, else torch's reason."""
    try:
        foreign = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back to torch's message
        foreign = []
    if not foreign:
        foreign = sorted({a or b for a, b in re.findall(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(exc))})
    if foreign:
        return True, (f"refused to load: it holds Python objects other than tensors and plain data "
                      f"({', '.join(foreign)}), and rebuilding them could run code")
    skip = ("weights only load failed", "please file an issue", "check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.lower().startswith(skip)] or [type(exc).__name__]
    return False, f"cannot be read as a PyTorch file ({lines[0].replace('WeightsUnpickler error: ', '')})"


def torch_load(path, map_location="cpu", safe_globals=(), what="model file",
               missing_fix="run the training rule first",
               fix="use a file written by brainsynth's training rules (retrain it); never load files from "
                   "untrusted sources with torch.load(weights_only=False)"):
    """``torch.load(weights_only=True)``: a model file is data and must not be able to run code.

    ``safe_globals`` are the only extra types allowed, for this call only. A refused or
    unreadable file raises :class:`InputError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} does not exist", file=path, fix=missing_fix)
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - every failure of a model file becomes one clear line
            refused, problem = _load_failure(path, exc)
            raise InputError(f"{what} {problem}", file=path, fix=fix if refused else missing_fix) from exc
