"""nnU-Net v2 datasets, planning, training and inference for the segmentation arms.

Every step goes through nnU-Net's own entry points; nothing here re-implements
nnU-Net:

* :func:`assemble_dataset` writes an ``nnUNet_raw/DatasetXXX_Name`` folder
  (symlinks to the real images, ``dataset.json``) atomically.
* :func:`plan_and_preprocess` runs ``nnUNetv2_plan_and_preprocess`` (fingerprint,
  integrity check, experiment planning) and ``nnUNetv2_preprocess``; with
  ``plans_overrides`` it first derives a smaller *real* nnU-Net plans file
  (:func:`derive_plans`, identifier e.g. ``nnUNetPlansDemo``) for CPU demos.
* :func:`train` runs :func:`brainsynth.nnunet_trainers.train_entry`, the
  ``nnUNetv2_train`` equivalent (nnU-Net's ``maybe_load_checkpoint``,
  ``trainer.run_training()``, ``trainer.perform_actual_validation()``) that finds
  the trainer class without importing every nnU-Net trainer module (that import
  walk needs ``timm``). The default trainer,
  :class:`brainsynth.nnunet_trainers.nnUNetTrainerBrainsynth`, is
  ``nnUNetTrainer`` with a configurable training length.
* :func:`predict` uses ``nnUNetPredictor`` (``manual_initialization`` from the
  model folder's plans/dataset/checkpoints, then ``predict_from_files_sequential``,
  no worker processes) in this process. Checkpoints are loaded with
  ``weights_only=True`` (:func:`load_nnunet_checkpoint`): a model file is data.

Paths. nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` from the environment. Each arm of the study gets its own
three roots (:class:`NnunetRoots`), so dataset IDs never collide between arms.
Planning, preprocessing and training run the command lines in a *subprocess*
whose environment holds the arm's roots: nothing leaks between arms or into
the calling process, and settings nnU-Net reads once at import time
(``nnUNet_def_n_proc`` in ``nnunetv2.configuration``) are honoured.

2D models. A ``2d`` configuration is trained on 2D slices that nnU-Net cuts
from the same 3D preprocessed volumes (along the first axis of its transposed
array: the lowest-resolution axis, for isotropic images the NIfTI's third
axis), and :func:`predict` with a 2D model takes the same 3D NIfTI inputs and
writes 3D NIfTI label maps: nnU-Net predicts slice by slice and stacks the
result, so 2D and 3D arms are evaluated on identical volumes.

CPU. nnU-Net's ``nnUNetv2_train -device cpu`` uses all CPUs for torch; on a
shared machine pass ``threads`` (torch oversubscription made a training step
~15x slower in our tests). ``num_processes`` sets nnU-Net's worker processes
(fingerprint, preprocessing, validation export: ``nnUNet_def_n_proc``);
``n_proc_da`` its data-augmentation workers (``nnUNet_n_proc_DA``, 0 = in the
training process).
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

TRAINER = "nnUNetTrainerBrainsynth"
DEFAULT_PLANS = "nnUNetPlans"
DEMO_PLANS = "nnUNetPlansDemo"
#: Small network for CPU demos; pass as ``plans_overrides`` (see :func:`derive_plans`).
DEMO_PLANS_OVERRIDES = {"base_features": 8, "max_features": 64, "max_stages": 4}
FILE_ENDING = ".nii.gz"
# training length of nnUNetTrainerBrainsynth (read by brainsynth.nnunet_trainers in the training process)
ENV_NUM_EPOCHS = "BRAINSYNTH_NNUNET_NUM_EPOCHS"
ENV_ITERATIONS = "BRAINSYNTH_NNUNET_ITERATIONS_PER_EPOCH"
ENV_VAL_ITERATIONS = "BRAINSYNTH_NNUNET_VAL_ITERATIONS"
ENV_SAVE_EVERY = "BRAINSYNTH_NNUNET_SAVE_EVERY"
# seed of python/numpy/torch in the training process ("none": unseeded, nnU-Net's default)
ENV_SEED = "BRAINSYNTH_NNUNET_SEED"
TRAINER_NAMES = (TRAINER,)

# console script -> (module, function); the same mapping as nnunetv2's entry_points.txt
_ENTRY_POINTS = {
    "nnUNetv2_plan_and_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
                                     "plan_and_preprocess_entry"),
    "nnUNetv2_preprocess": ("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "preprocess_entry"),
    # nnUNetv2_train with a trainer lookup that works without timm (see brainsynth.nnunet_trainers)
    "brainsynth_nnunet_train": ("brainsynth.nnunet_trainers", "train_entry"),
}
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------- roots
@dataclass(frozen=True)
class NnunetRoots:
    """The three nnU-Net folders of one study arm."""

    raw: Path
    preprocessed: Path
    results: Path

    @classmethod
    def under(cls, base):
        """``base/nnUNet_raw``, ``base/nnUNet_preprocessed``, ``base/nnUNet_results``."""
        base = Path(base)
        return cls(base / "nnUNet_raw", base / "nnUNet_preprocessed", base / "nnUNet_results")

    def env(self):
        """The environment variables nnU-Net reads, as absolute paths."""
        return {"nnUNet_raw": str(Path(self.raw).absolute()),
                "nnUNet_preprocessed": str(Path(self.preprocessed).absolute()),
                "nnUNet_results": str(Path(self.results).absolute())}

    def makedirs(self):
        for p in (self.raw, self.preprocessed, self.results):
            Path(p).mkdir(parents=True, exist_ok=True)


def as_roots(roots):
    """Accept :class:`NnunetRoots`, a base folder, or a mapping with raw/preprocessed/results."""
    if isinstance(roots, NnunetRoots):
        return NnunetRoots(Path(roots.raw), Path(roots.preprocessed), Path(roots.results))
    if isinstance(roots, (str, os.PathLike)):
        return NnunetRoots.under(roots)
    if isinstance(roots, dict):
        def pick(*keys):
            for k in keys:
                if roots.get(k):
                    return Path(roots[k])
            raise InputError(f"nnU-Net roots mapping lacks {keys[0]!r}", field="roots",
                             fix="give raw, preprocessed and results folders")
        return NnunetRoots(pick("raw", "nnUNet_raw"), pick("preprocessed", "nnUNet_preprocessed"),
                           pick("results", "nnUNet_results"))
    raise InputError(f"cannot interpret nnU-Net roots {roots!r}", field="roots",
                     fix="pass NnunetRoots, a base folder or a dict")


def dataset_folder_name(dataset_id, dataset_name):
    dataset_id = _check_dataset_id(dataset_id)
    if not _DATASET_NAME.match(str(dataset_name)):
        raise InputError(f"nnU-Net dataset name {dataset_name!r} must be letters, digits, '_' and '-'",
                         field="dataset_name", fix="e.g. 'BrainReal' or 'Brain-Synthetic'")
    return f"Dataset{dataset_id:03d}_{dataset_name}"


def _check_dataset_id(dataset_id):
    value = None
    if isinstance(dataset_id, int) and not isinstance(dataset_id, bool):
        value = dataset_id
    elif isinstance(dataset_id, str) and dataset_id.isdigit():
        value = int(dataset_id)
    if value is None or not 1 <= value <= 999:
        raise InputError(f"nnU-Net dataset id must be an integer 1..999, got {dataset_id!r}",
                         field="dataset_id", fix="use e.g. 101")
    return value


def find_dataset_name(dataset_id, roots, where=("raw", "preprocessed", "results")):
    """``DatasetXXX_Name`` for an id, looked up in the arm's roots (those named in ``where``)."""
    roots = as_roots(roots)
    prefix = f"Dataset{_check_dataset_id(dataset_id):03d}_"
    names = set()
    for base in (getattr(roots, w) for w in where):
        if Path(base).is_dir():
            names |= {p.name for p in Path(base).iterdir() if p.is_dir() and p.name.startswith(prefix)}
    if len(names) != 1:
        raise InputError(f"expected exactly one nnU-Net dataset {prefix}* under {roots}, found {sorted(names)}",
                         field="dataset_id", fix="assemble the dataset first / remove stale datasets")
    return names.pop()


# --------------------------------------------------------------------------- dataset
def assemble_dataset(cases, dataset_id, dataset_name, channel_names, labels, raw_root,
                     test_cases=None, relative_links=True, file_ending=FILE_ENDING, extra=None):
    """Write ``raw_root/DatasetXXX_Name`` in nnU-Net v2 raw format; return its path.

    ``cases``: list of ``{"case_id", "images": {channel: path}, "label": path}``;
    ``test_cases`` (optional): same without ``label``, linked into ``imagesTs``.
    ``channel_names``: ``{channel: name}`` or ``{index: name}``; channel order is
    the dict order for channel keys (``case_0000`` is the first), the numeric order
    for ``{"0": "t1", ...}``. ``labels``: ``{name: value}``, with ``background: 0``
    and values 0..K-1 (nnU-Net requires consecutive labels).

    Images are symbolic links (relative by default) to the given files, named
    ``{case_id}_{XXXX}{file_ending}``. The folder is built next to its final place
    and renamed into it, replacing an earlier version, so readers never see a half
    written dataset.
    """
    raw_root = Path(raw_root)
    final = raw_root / dataset_folder_name(dataset_id, dataset_name)
    channels = _channel_order(channel_names)
    labels = _check_labels(labels)
    train = _check_cases(cases, channels, file_ending, with_label=True, what="cases")
    test = _check_cases(test_cases or [], channels, file_ending, with_label=False, what="test_cases")
    clash = {c["case_id"] for c in train} & {c["case_id"] for c in test}
    if clash:
        raise InputError(f"case ids {sorted(clash)} are both training and test cases", field="test_cases",
                         fix="give test cases their own ids")
    raw_root.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in raw_root.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != final.name]
    if others:
        raise InputError(f"dataset id {int(dataset_id)} is already used by {others} in {raw_root}",
                         field="dataset_id", fix="use another id or delete the old dataset folder")

    for stale in list(raw_root.glob(f".{final.name}.tmp-*")) + list(raw_root.glob(f".{final.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=raw_root))
    try:
        def link(src, sub, name):
            src_real = os.path.realpath(src)
            target = os.path.relpath(src_real, os.path.realpath(final / sub)) if relative_links else src_real
            (tmp / sub).mkdir(exist_ok=True)
            os.symlink(target, tmp / sub / name)

        for case in train:
            for i, (key, _name) in enumerate(channels):
                link(case["images"][key], "imagesTr", f"{case['case_id']}_{i:04d}{file_ending}")
            link(case["label"], "labelsTr", f"{case['case_id']}{file_ending}")
        for case in test:
            for i, (key, _name) in enumerate(channels):
                link(case["images"][key], "imagesTs", f"{case['case_id']}_{i:04d}{file_ending}")
        (tmp / "imagesTr").mkdir(exist_ok=True)
        (tmp / "labelsTr").mkdir(exist_ok=True)
        dataset_json = {
            "channel_names": {str(i): name for i, (_key, name) in enumerate(channels)},
            "labels": labels,
            "numTraining": len(train),
            "file_ending": file_ending,
            "name": dataset_name,
        }
        if extra:
            dataset_json.update(extra)
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(src, dst):
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first, then deleted."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _channel_order(channel_names):
    if not channel_names:
        raise InputError("no channels given", field="channel_names", fix="e.g. {'t1': 'T1', 't2': 'T2'}")
    if isinstance(channel_names, (list, tuple)):
        return [(str(c), str(c)) for c in channel_names]
    keys = [str(k) for k in channel_names]
    if all(k.isdigit() for k in keys):
        items = sorted(((str(k), str(v)) for k, v in channel_names.items()), key=lambda kv: int(kv[0]))
        if [int(k) for k, _ in items] != list(range(len(items))):
            raise InputError(f"numeric channel keys must be 0..{len(items) - 1}, got {keys}",
                             field="channel_names", fix="number channels from 0")
        return items
    return [(str(k), str(v)) for k, v in channel_names.items()]


def _check_labels(labels):
    if not labels:
        raise InputError("no labels given", field="labels", fix="e.g. {'background': 0, 'wm': 1}")
    out = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int,)) and not str(value).isdigit():
            raise InputError(f"label {name!r} has non-integer value {value!r}", field="labels",
                             fix="use integer label values")
        out[str(name)] = int(value)
    values = sorted(out.values())
    if values != list(range(len(values))):
        raise InputError(f"nnU-Net needs consecutive label values 0..{len(values) - 1}, got {values}",
                         field="labels", fix="relabel to consecutive values")
    if out.get("background") != 0:
        raise InputError("labels must map 'background' to 0", field="labels", fix="add 'background': 0")
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def _check_cases(cases, channels, file_ending, with_label, what):
    problems, out, seen = [], [], set()
    for n, case in enumerate(cases):
        cid = str(case.get("case_id", ""))
        if not _CASE_ID.match(cid):
            problems.append(InputError(f"case #{n} has invalid case_id {cid!r}", field=what,
                                       fix="use letters, digits, '.', '_' and '-'"))
            continue
        if cid in seen:
            problems.append(InputError(f"duplicate case_id {cid!r}", field=what, fix="make case ids unique"))
            continue
        seen.add(cid)
        images = {str(k): v for k, v in (case.get("images") or {}).items()}
        missing = [k for k, _ in channels if k not in images]
        if missing:
            problems.append(InputError(f"case {cid!r} lacks channels {missing}", field=what,
                                       fix=f"give images for {[k for k, _ in channels]}"))
            continue
        files = [images[k] for k, _ in channels] + ([case.get("label")] if with_label else [])
        for f in files:
            if f is None or not Path(f).is_file():
                problems.append(InputError(f"case {cid!r}: file missing", file=f, field=what,
                                           fix="check the path"))
            elif not str(f).endswith(file_ending):
                problems.append(InputError(f"case {cid!r}: file does not end with {file_ending}", file=f,
                                           field=what, fix=f"convert to {file_ending}"))
        out.append({"case_id": cid, "images": images, "label": case.get("label")})
    if with_label and not cases:
        problems.append(InputError("no training cases", field=what, fix="give at least one case"))
    if problems:
        if len(problems) == 1:
            raise problems[0]
        from .errors import InputErrors
        raise InputErrors(problems)
    return out


# --------------------------------------------------------------------------- subprocess helper
def resolve_device(device="auto"):
    """'auto' -> 'cuda' if available, else 'mps', else 'cpu'."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"device must be auto, cpu, cuda or mps, got {device!r}", field="device",
                         fix="use 'auto'")
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _nnunet_command(script):
    exe = Path(sys.executable).parent / script
    if script.startswith("nnUNetv2_") and exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    module, func = _ENTRY_POINTS[script]
    return [sys.executable, "-c",
            f"import sys; sys.argv[0] = {script!r}; from {module} import {func}; sys.exit({func}())"]


def _run_nnunet(script, args, env, log=None):
    """Run an nnU-Net console script; stream its output to ``log`` (append) or stdout."""
    cmd = _nnunet_command(script) + [str(a) for a in args]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    # brainsynth importable in the child even when not installed
    pkg_parent = str(Path(__file__).resolve().parents[1])
    full_env["PYTHONPATH"] = os.pathsep.join([pkg_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    tail = deque(maxlen=60)
    header = f"$ {' '.join(f'{k}={v}' for k, v in sorted(env.items()))} {script} {' '.join(map(str, args))}\n"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(log, "a")) if log else sys.stdout
        sink.write(header)
        sink.flush()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            tail.append(line)
            sink.write(line)
        rc = proc.wait()
        sink.write(f"[{script} exit code {rc} after {time.monotonic() - start:.1f} s]\n")
        sink.flush()
    if rc != 0:
        raise RuntimeError(f"{script} failed with exit code {rc}\n{header}--- last output ---\n{''.join(tail)}")


def _base_env(roots, num_processes, threads):
    env = roots.env()
    env["nnUNet_def_n_proc"] = str(int(num_processes))
    if threads is not None:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(int(threads))
    return env


# --------------------------------------------------------------------------- planning
def plan_and_preprocess(dataset_id, roots, configurations=("3d_fullres",), num_processes=1,
                        plans_overrides=None, plans_identifier=None, planner="ExperimentPlanner",
                        gpu_memory_target=None, verify_dataset_integrity=True, threads=None, log=None):
    """Fingerprint, plan and preprocess an assembled dataset with nnU-Net; return the plans file.

    Starts from an empty ``nnUNet_preprocessed/DatasetXXX_Name`` (so a changed
    dataset never meets stale preprocessed cases or ``splits_final.json``), runs
    ``nnUNetv2_plan_and_preprocess --no_pp`` with ``planner`` (fingerprint,
    ``--verify_dataset_integrity``, experiment planning), then, if
    ``plans_overrides`` is given, :func:`derive_plans` writes a smaller plans
    file under ``plans_identifier`` (default :data:`DEMO_PLANS`) from the planned
    ``nnUNetPlans``, and finally ``nnUNetv2_preprocess`` for ``configurations``
    ('2d', '3d_fullres', ...) with that plans identifier. Without overrides the
    planner writes ``plans_identifier`` (default ``nnUNetPlans``) directly.
    ``num_processes``: nnU-Net worker processes (fingerprint, preprocessing).
    """
    roots = as_roots(roots)
    roots.makedirs()
    dataset_id = _check_dataset_id(dataset_id)
    configurations = [configurations] if isinstance(configurations, str) else list(configurations)
    if not configurations:
        raise InputError("no nnU-Net configuration given", field="configurations", fix="e.g. ['3d_fullres']")
    env = _base_env(roots, num_processes, threads)
    pp = roots.preprocessed / find_dataset_name(dataset_id, roots, where=("raw",))
    if pp.exists():
        shutil.rmtree(pp)
    planned = DEFAULT_PLANS if plans_overrides else (plans_identifier or DEFAULT_PLANS)
    args = ["-d", dataset_id, "-pl", planner, "-npfp", num_processes, "--no_pp", "--clean",
            "-overwrite_plans_name", planned, "-c", *configurations]
    if verify_dataset_integrity:
        args.append("--verify_dataset_integrity")
    if gpu_memory_target is not None:
        args += ["-gpu_memory_target", gpu_memory_target]
    if "no_pbar" in _supported_flags():
        args.append("--no_pbar")
    _run_nnunet("nnUNetv2_plan_and_preprocess", args, env, log)

    if plans_overrides:
        plans_identifier = plans_identifier or DEMO_PLANS
        if plans_identifier == planned:
            raise InputError(f"derived plans need their own identifier, not {planned!r}",
                             field="plans_identifier", fix=f"e.g. {DEMO_PLANS!r}")
        derive_plans(pp / f"{planned}.json", plans_identifier, plans_overrides, configurations=configurations)
    else:
        plans_identifier = planned
    args = ["-d", dataset_id, "-plans_name", plans_identifier, "-c", *configurations,
            "-np", *([num_processes] * len(configurations))]
    if "no_pbar" in _supported_flags():
        args.append("--no_pbar")
    _run_nnunet("nnUNetv2_preprocess", args, env, log)
    plans_file = pp / f"{plans_identifier}.json"
    for c in configurations:
        data_id = json.loads(plans_file.read_text())["configurations"][c].get("data_identifier")
        if data_id and not (pp / data_id).is_dir():
            raise RuntimeError(f"nnU-Net preprocessing produced no {pp / data_id}")
    return plans_file


def _supported_flags():
    # --no_pbar exists in nnunetv2 >= 2.6; keep older installs working
    from importlib.metadata import version

    try:
        major, minor = (int(x) for x in version("nnunetv2").split(".")[:2])
    except Exception:  # pragma: no cover
        return set()
    return {"no_pbar"} if (major, minor) >= (2, 6) else set()


_OVERRIDE_KEYS = ("base_features", "max_features", "max_stages", "n_conv_per_stage", "batch_size", "patch_size")


def derive_plans(source_plans_file, plans_identifier, overrides, configurations=None):
    """Write a smaller copy of an nnU-Net plans file as ``<plans_identifier>.json``.

    ``overrides`` is a dict with any of

    * ``max_stages``: cut the U-Net to at most this many resolution stages,
    * ``base_features`` / ``max_features``: features per stage become
      ``min(base_features * 2**stage, max_features)``,
    * ``n_conv_per_stage``: convolutions per encoder/decoder block,
    * ``batch_size``, ``patch_size``: replace nnU-Net's choice,

    applied to every configuration in ``configurations`` (default: all that
    define an architecture), or a dict ``{configuration: {...}}`` for
    per-configuration values. Everything else (spacing, normalisation,
    resampling, intensity statistics) stays as nnU-Net planned it; ``plans_name``
    and ``data_identifier`` are renamed so the derived plans get their own
    preprocessed data and result folders. Returns the new file.
    """
    source_plans_file = Path(source_plans_file)
    plans = json.loads(source_plans_file.read_text())
    if not re.match(r"^[A-Za-z0-9_-]+$", str(plans_identifier)):
        raise InputError(f"invalid plans identifier {plans_identifier!r}", field="plans_identifier",
                         fix="letters, digits, '_' and '-' only, e.g. nnUNetPlansDemo")
    confs = plans["configurations"]
    overrides = dict(overrides or {})
    if overrides and all(k in confs or isinstance(v, dict) for k, v in overrides.items()):
        per_conf = overrides
        if configurations:
            per_conf = {k: v for k, v in per_conf.items() if k in configurations}
    else:
        wanted = list(configurations) if configurations else [c for c, v in confs.items() if "architecture" in v]
        per_conf = {c: overrides for c in wanted}
    old_name = plans["plans_name"]
    plans["plans_name"] = plans_identifier
    for name, ov in per_conf.items():
        unknown = sorted(set(ov) - set(_OVERRIDE_KEYS))
        if unknown:
            raise InputError(f"unknown plans override(s) {unknown}", field="plans_overrides",
                             fix=f"use {list(_OVERRIDE_KEYS)}")
        if name not in confs:
            raise InputError(f"configuration {name!r} not in {source_plans_file} (has {sorted(confs)})",
                             field="configurations", fix="plan it first or pick another configuration")
        _shrink_configuration(name, confs[name], **ov)
    for conf in confs.values():
        if conf.get("data_identifier", "").startswith(old_name):
            conf["data_identifier"] = plans_identifier + conf["data_identifier"][len(old_name):]
    out = source_plans_file.with_name(f"{plans_identifier}.json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(plans, indent=4) + "\n")
    os.replace(tmp, out)
    return out


def _shrink_configuration(name, conf, base_features=None, max_features=None, max_stages=None,
                          n_conv_per_stage=None, batch_size=None, patch_size=None):
    if "architecture" not in conf:
        raise InputError(f"configuration {name!r} inherits its architecture; override its parent instead",
                         field="plans_overrides", fix="override e.g. '3d_fullres'")
    kw = conf["architecture"]["arch_kwargs"]
    n = int(kw["n_stages"])
    if max_stages is not None:
        n = max(1, min(n, int(max_stages)))
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        if isinstance(kw.get(key), list):
            kw[key] = kw[key][:n]
    if isinstance(kw.get("n_conv_per_stage_decoder"), list):
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:n - 1]
    kw["n_stages"] = n
    if base_features is not None or max_features is not None:
        base = int(base_features) if base_features is not None else int(kw["features_per_stage"][0])
        cap = int(max_features) if max_features is not None else max(kw["features_per_stage"])
        kw["features_per_stage"] = [min(base * 2 ** i, cap) for i in range(n)]
    if n_conv_per_stage is not None:
        if isinstance(kw.get("n_conv_per_stage"), list):
            kw["n_conv_per_stage"] = [int(n_conv_per_stage)] * n
        if isinstance(kw.get("n_conv_per_stage_decoder"), list):
            kw["n_conv_per_stage_decoder"] = [int(n_conv_per_stage)] * (n - 1)
    if batch_size is not None:
        conf["batch_size"] = int(batch_size)
    if patch_size is not None:
        ps = [int(p) for p in patch_size]
        if len(ps) != len(conf["patch_size"]):
            raise InputError(f"patch_size {ps} has wrong dimension for {name} ({conf['patch_size']})",
                             field="plans_overrides.patch_size", fix="give one size per axis")
        conf["patch_size"] = ps
    # every patch axis must be divisible by the network's total downsampling
    total = [1] * len(conf["patch_size"])
    for st in kw["strides"]:
        st = [st] * len(total) if isinstance(st, int) else st
        total = [t * int(x) for t, x in zip(total, st)]
    if any(p % t for p, t in zip(conf["patch_size"], total)):
        raise InputError(f"patch size {conf['patch_size']} of {name} is not divisible by the network's "
                         f"downsampling {total}", field="plans_overrides",
                         fix="pick a patch size divisible by it or fewer stages")


# --------------------------------------------------------------------------- training
def model_folder(dataset_id, roots, configuration="3d_fullres", trainer=TRAINER, plans=DEFAULT_PLANS):
    """nnU-Net's result folder ``<results>/DatasetXXX_Name/<trainer>__<plans>__<configuration>``."""
    roots = as_roots(roots)
    return roots.results / find_dataset_name(dataset_id, roots) / f"{trainer}__{plans}__{configuration}"


def train(dataset_id, roots, configuration="3d_fullres", fold="all", trainer=TRAINER, plans=DEFAULT_PLANS,
          epochs=None, iterations_per_epoch=None, val_iterations_per_epoch=None, device="auto",
          num_processes=1, n_proc_da=None, threads=None, continue_training=False, final_validation=True,
          seed=0, log=None):
    """Train one nnU-Net model; return the model folder.

    Runs :func:`brainsynth.nnunet_trainers.train_entry` (``nnUNetv2_train`` with a
    trainer lookup that does not need ``timm``) in a subprocess with the arm's roots.

    ``fold``: 0-4 (nnU-Net's 5-fold split) or 'all' (all training cases; the
    final validation then runs on training cases). ``trainer``: any trainer
    nnU-Net ships (``nnUNetTrainer``, ``nnUNetTrainer_5epochs``, ...) or
    :data:`TRAINER`, whose length is set by ``epochs`` /
    ``iterations_per_epoch`` / ``val_iterations_per_epoch`` (``None`` keeps
    nnU-Net's 1000 / 250 / 50). ``n_proc_da``: data augmentation workers
    (``nnUNet_n_proc_DA``; 0 = in the training process); ``num_processes``: worker
    processes of the final validation export (``nnUNet_def_n_proc``); ``threads``:
    torch CPU threads (default like ``nnUNetv2_train``: all CPUs on cpu; on a
    shared machine give Snakemake's ``threads`` — oversubscription makes CPU
    training many times slower). ``final_validation=False`` skips nnU-Net's
    closing prediction of the fold's validation cases.

    ``seed`` (``None``: unseeded) seeds python, numpy and torch in the training
    process (:class:`~brainsynth.nnunet_trainers.nnUNetTrainerBrainsynth`). On CPU
    with ``n_proc_da=0`` and fixed ``threads`` two trainings with the same seed
    give bit-identical weights; augmentation workers (``n_proc_da > 0``, nnU-Net's
    ``NonDetMultiThreadedAugmenter``) and CUDA (cudnn benchmark) are not
    reproducible.
    """
    roots = as_roots(roots)
    dataset_id = _check_dataset_id(dataset_id)
    if str(fold) != "all" and not str(fold).isdigit():
        raise InputError(f"fold must be 0-4 or 'all', got {fold!r}", field="fold", fix="use 'all' or 0")
    length = {ENV_NUM_EPOCHS: epochs, ENV_ITERATIONS: iterations_per_epoch,
              ENV_VAL_ITERATIONS: val_iterations_per_epoch}
    given = {k: v for k, v in length.items() if v is not None}
    if given and trainer not in TRAINER_NAMES:
        raise InputError(f"epochs/iterations can only be set for {TRAINER_NAMES}, not for {trainer!r}",
                         field="trainer", fix=f"use trainer={TRAINER!r} or drop epochs/iterations")
    for k, v in given.items():
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise InputError(f"training length must be a positive integer, got {v!r}", field=k.lower(),
                             fix="e.g. 2")
    pp = roots.preprocessed / find_dataset_name(dataset_id, roots)
    if not (pp / f"{plans}.json").is_file():
        raise InputError(f"no plans {plans!r} for dataset {dataset_id}", file=pp / f"{plans}.json",
                         fix="run plan_and_preprocess with that plans identifier first")
    device = resolve_device(device)
    env = _base_env(roots, num_processes, threads)
    for k in (ENV_NUM_EPOCHS, ENV_ITERATIONS, ENV_VAL_ITERATIONS):
        env[k] = str(int(given[k])) if k in given else ""  # "" = trainer default, also hides caller's env
    if n_proc_da is not None:
        env["nnUNet_n_proc_DA"] = str(int(n_proc_da))
    env[ENV_SEED] = "none" if seed is None else str(int(seed))
    args = [dataset_id, configuration, fold, "-tr", trainer, "-p", plans, "-device", device]
    if threads is not None:
        args += ["-threads", threads]
    if continue_training:
        args.append("--c")
    if not final_validation:
        args.append("--skip_final_validation")
    _run_nnunet("brainsynth_nnunet_train", args, env, log)
    out = model_folder(dataset_id, roots, configuration, trainer, plans)
    ckpt = out / f"fold_{fold}" / "checkpoint_final.pth"
    if not ckpt.is_file():
        raise RuntimeError(f"nnUNetv2_train finished without writing {ckpt}")
    return out


# --------------------------------------------------------------------------- inference
def _model_folder_of(model, roots, configuration, trainer, plans):
    """A trained nnU-Net model folder, given as the folder or as a dataset id with ``roots``."""
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        folder = Path(model)
    else:
        if roots is None:
            raise InputError(f"model {model!r} is not a folder; give roots to find it by dataset id",
                             field="model", fix="pass the folder train() returned")
        folder = model_folder(model, roots, configuration, trainer, plans)
    if not (folder / "plans.json").is_file():
        raise InputError("not an nnU-Net model folder (no plans.json)", file=folder, field="model",
                         fix="pass the folder train() returned")
    return folder


def _case_files(folder, input_cases):
    """``(source, ids)``: a folder of nnU-Net named files and its case ids, or per case the
    image files in the model's channel order (checked to exist) and the case ids."""
    dataset_json = json.loads((folder / "dataset.json").read_text())
    channel_names = {str(k): v for k, v in dataset_json["channel_names"].items()}
    ending = dataset_json["file_ending"]
    if isinstance(input_cases, (str, os.PathLike)):
        source = str(input_cases)
        ids = sorted({re.sub(r"_\d{4}$", "", p.name[:-len(ending)]) for p in Path(source).glob(f"*{ending}")})
    else:
        source, ids = [], []
        for n, case in enumerate(input_cases):
            cid = str(case.get("case_id", ""))
            if not _CASE_ID.match(cid) or cid in ids:
                raise InputError(f"invalid or duplicate case_id {cid!r} (case #{n})", field="input_cases",
                                 fix="unique ids of letters, digits, '.', '_', '-'")
            images = {str(k): v for k, v in case["images"].items()}
            files = []
            for idx in sorted(channel_names, key=int):
                f = images.get(channel_names[idx], images.get(idx))
                if f is None or not Path(f).is_file():
                    raise InputError(f"case {cid!r}: no image for channel {channel_names[idx]!r}", file=f,
                                     field="input_cases", fix=f"give images for {list(channel_names.values())}")
                files.append(str(f))
            source.append(files)
            ids.append(cid)
    if not ids:
        raise InputError("no input cases to predict", field="input_cases", fix="give at least one case")
    return source, ids


@contextlib.contextmanager
def _torch_threads(threads):
    """torch's CPU thread count set for a block and restored after it."""
    import torch

    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _loaded_predictor(folder, folds, checkpoint, device, **kwargs):
    """An ``nnUNetPredictor`` on the resolved device with the model folder's weights loaded."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch_device = torch.device(resolve_device(device))
    predictor = nnUNetPredictor(device=torch_device, perform_everything_on_device=torch_device.type == "cuda",
                                verbose_preprocessing=False, allow_tqdm=False, **kwargs)
    _initialize_predictor(predictor, folder, (folds,) if isinstance(folds, (str, int)) else folds, checkpoint)
    return predictor


def predict(model, input_cases, out_dir, folds=None, checkpoint="checkpoint_final.pth", device="auto",
            tile_step_size=0.5, use_mirroring=False, use_gaussian=True, threads=None, roots=None,
            configuration="3d_fullres", trainer=TRAINER, plans=DEFAULT_PLANS, verbose=False):
    """Segment ``input_cases`` with a trained nnU-Net model; return ``{case_id: Path}``.

    ``model``: the model folder returned by :func:`train`, or a dataset id (then
    ``roots`` / ``configuration`` / ``trainer`` / ``plans`` locate the folder).
    ``input_cases``: list of ``{"case_id", "images": {channel: path}}``, the
    channels keyed like the training dataset's channel names (or by index) — or
    a folder of nnU-Net named files (``case_0000.nii.gz``, ...). ``folds``:
    the folds to ensemble (default: all found). Writes ``out_dir/<case_id>.nii.gz``
    with the geometry of the input images. Test-time mirroring is off by
    default (``use_mirroring``).
    """
    folder = _model_folder_of(model, roots, configuration, trainer, plans)
    ending = json.loads((folder / "dataset.json").read_text())["file_ending"]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    source, ids = _case_files(folder, input_cases)

    with _torch_threads(threads):
        for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed prediction
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            predictor = _loaded_predictor(folder, folds, checkpoint, device, tile_step_size=tile_step_size,
                                          use_gaussian=use_gaussian, use_mirroring=use_mirroring, verbose=verbose)
            if isinstance(source, str):
                predictor.predict_from_files_sequential(source, str(tmp), save_probabilities=False, overwrite=True)
            else:
                predictor.predict_from_files_sequential(source, [str(tmp / cid) for cid in ids],
                                                        save_probabilities=False, overwrite=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            result = {}
            for cid in ids:
                produced = tmp / f"{cid}{ending}"
                if not produced.is_file():
                    raise RuntimeError(f"nnU-Net wrote no prediction for case {cid!r}")
                os.replace(produced, out_dir / produced.name)
                result[cid] = out_dir / produced.name
            args_json = tmp / "predict_from_raw_data_args.json"
            if args_json.is_file():  # nnU-Net's record of the call names the (random) temporary folder
                args_json.write_text(args_json.read_text().replace(str(tmp), str(out_dir)))
            for extra in ("predict_from_raw_data_args.json", "dataset.json", "plans.json"):
                if (tmp / extra).is_file():
                    os.replace(tmp / extra, out_dir / extra)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def predict_for_rule(model_json, cases, out_dir, log_path, **kwargs):
    """:func:`predict` with a rule's conventions: the model named by ``model.json``
    (train_segmentation's record), nnU-Net's prints appended to the rule's log, and each
    case's prediction checked to be ``out_dir/<case_id>.nii.gz``. ``kwargs``: of predict."""
    model = json.loads(Path(model_json).read_text())
    out_dir = Path(out_dir)
    cases = [{"case_id": c["case_id"], "images": c["images"]} for c in cases]
    with open(log_path, "a") as sink, contextlib.redirect_stdout(sink):
        written = predict(model["model_folder"], cases, out_dir, folds=[model["fold"]], **kwargs)
    expected = {c["case_id"]: out_dir / f"{c['case_id']}.nii.gz" for c in cases}
    for cid, path in written.items():
        if Path(path).resolve() != expected[cid].resolve():
            raise RuntimeError(f"prediction of {cid} written to {path}, expected {expected[cid]}")
    return expected


def encoder_features(model, input_cases, folds=None, checkpoint="checkpoint_final.pth", device="auto",
                     threads=None):
    """In-domain image features from a trained nnU-Net: per case the mean and the standard
    deviation of each channel of the encoder's deepest stage over the case (2d models: over
    all its axial slices), after nnU-Net's own preprocessing. Returns ``(ids, (N, 2F) array)``.

    Why: a published feature network (Inception, MedicalNet) needs downloaded weights and
    was not trained on these images; the workflow's own real-data segmenter was, offline.
    """
    import numpy as np
    import torch

    folder = _model_folder_of(model, None, None, None, None)
    source, ids = _case_files(folder, input_cases)
    if isinstance(source, str):
        raise InputError("encoder_features needs a list of cases, not a folder", field="input_cases")
    with _torch_threads(threads):
        predictor = _loaded_predictor(folder, folds, checkpoint, device)
        net = predictor.network.to(predictor.device).eval()
        two_d = len(predictor.configuration_manager.patch_size) == 2
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        rows = []
        for files in source:
            data, _, _ = preprocessor.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                               predictor.dataset_json)
            x = torch.from_numpy(np.asarray(data, dtype=np.float32)).to(predictor.device)  # (C, Z, Y, X)
            x = x.permute(1, 0, 2, 3) if two_d else x[None]
            with torch.no_grad():
                stages = [net.encoder(x[i:i + 16]) for i in range(0, x.shape[0], 16)]
            deep = torch.cat([f[-1] if isinstance(f, (list, tuple)) else f for f in stages])
            flat = deep.transpose(0, 1).reshape(deep.shape[1], -1).double()
            rows.append(torch.cat([flat.mean(1), flat.std(1)]).cpu().numpy())
    return ids, np.stack(rows)


def _numpy_scalar_globals():
    """numpy float scalars (``np.float32`` ...) as pickled by numpy 2 and by numpy 1.x.

    nnU-Net stores its logged metrics and ``_best_ema`` as numpy float scalars; rebuilding
    one only calls ``numpy.dtype(str)``, sets the dtype's state and calls
    ``scalar(dtype, raw bytes)``, never other code. Arrays and other dtypes stay refused.
    """
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    return [np.dtype, (scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
            *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64))]


#: keys of nnU-Net's ``save_checkpoint`` dict that inference reads
NNUNET_CHECKPOINT_KEYS = ("network_weights", "trainer_name", "init_args")


def load_nnunet_checkpoint(path):
    """An nnU-Net v2 checkpoint (``checkpoint_final.pth`` ...) loaded with ``weights_only=True``.

    Besides tensors and plain data nnU-Net's checkpoints hold numpy float scalars
    (logged metrics, ``_best_ema``: the only allow-listed types, see
    :func:`_numpy_scalar_globals`) and a ``torch.device`` in ``init_args`` (allowed by
    torch). Anything else is refused with an :class:`InputError`.
    """
    import torch

    from .model_files import torch_load

    path = Path(path)
    ckpt = torch_load(path, map_location=torch.device("cpu"), safe_globals=_numpy_scalar_globals(),
                      what="nnU-Net checkpoint", missing_fix="train the model first (or retrain it)",
                      fix="use a checkpoint written by nnU-Net v2's trainer from a source you trust, or retrain "
                          "the model; never load it with torch.load(weights_only=False)")
    missing = [k for k in NNUNET_CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"not an nnU-Net v2 checkpoint (missing {missing})", file=path,
                         fix="point the model to an nnU-Net v2 results folder")
    return ckpt


def _initialize_predictor(predictor, folder, folds, checkpoint):
    """``nnUNetPredictor.initialize_from_trained_model_folder`` with brainsynth's trainer lookup.

    nnU-Net's own version loads the checkpoints with ``weights_only=False`` (a shared
    model file could run code) and looks the trainer class up by name, which imports
    all nnU-Net trainer modules and fails without ``timm`` for any trainer other than
    ``nnUNetTrainer``; this loads them with :func:`load_nnunet_checkpoint`, builds the
    network with the checkpoint's trainer class and hands it over with the public
    ``manual_initialization``.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from .nnunet_trainers import resolve_trainer

    if folds is None:  # like nnUNetPredictor.auto_detect_available_folds, but fold 'all' when alone
        found = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file())
        folds = [int(f) for f in found if f.isdigit()] or [f for f in found if f == "all"]
    if not folds:
        raise InputError(f"no fold_*/{checkpoint} in the model folder", file=folder, field="model",
                         fix="train the model first")
    parameters = []
    for i, f in enumerate(folds):
        f = f if str(f) == "all" else int(f)
        ckpt = load_nnunet_checkpoint(folder / f"fold_{f}" / checkpoint)
        if i == 0:
            trainer_name = ckpt["trainer_name"]
            configuration_name = ckpt["init_args"]["configuration"]
            mirror_axes = ckpt.get("inference_allowed_mirroring_axes")
        parameters.append(ckpt["network_weights"])
    dataset_json = json.loads((folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((folder / "plans.json").read_text()))
    configuration_manager = plans_manager.get_configuration(configuration_name)
    trainer_class = resolve_trainer(trainer_name)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False)
    network.load_state_dict(parameters[0])
    predictor.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                    trainer_name, mirror_axes)
