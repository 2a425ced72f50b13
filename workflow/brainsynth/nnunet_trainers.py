"""nnU-Net v2 trainer variants used by the workflow.

``nnUNetTrainerBrainsynth`` is nnU-Net's own ``nnUNetTrainer`` (same network,
loss, augmentation, optimiser, schedule, checkpointing and final validation);
the only difference is that the training *length* can be set without writing a
new class per length:

===========================================  ===================================  ========
environment variable                         trainer attribute                    default
===========================================  ===================================  ========
``BRAINSYNTH_NNUNET_NUM_EPOCHS``             ``num_epochs``                       1000
``BRAINSYNTH_NNUNET_ITERATIONS_PER_EPOCH``   ``num_iterations_per_epoch``         250
``BRAINSYNTH_NNUNET_VAL_ITERATIONS``         ``num_val_iterations_per_epoch``     50
``BRAINSYNTH_NNUNET_SAVE_EVERY``             ``save_every``                       50
===========================================  ===================================  ========

When the number of epochs is set, ``progress.png`` is redrawn every ``save_every`` epochs and
after the last one instead of after every epoch (the curves it draws are the same at the end).

And ``BRAINSYNTH_NNUNET_SEED`` (default 0; ``none``: unseeded like nnU-Net) seeds
python's, numpy's and torch's generators when the trainer is created, before
nnU-Net builds the network and its data loaders, and on CPU switches torch to
deterministic algorithms. nnU-Net itself seeds only its data splits, so two
unseeded trainings differ; seeded ones on CPU with in-process augmentation
(``nnUNet_n_proc_DA=0``) and a fixed thread count are bit-identical.

Two changes make it faster and change nothing it computes (same seed: the same weights bit
for bit) where augmentation runs in the training process (the workflow's CPU setting): each
training case is read from disk once and then kept in memory
(:class:`CasesInMemory`, up to :data:`CASE_CACHE_BYTES` for training and validation together,
their slices copies as nnU-Net's are; nnU-Net opens the case's two blosc2 files
and its properties pickle for every patch it draws), and the data loader's per-batch thread limit
reuses one ``threadpoolctl`` controller instead of scanning the loaded libraries for each batch.
On the demo's 2d tissue arm on one CPU thread these were 1.7 s and 0.9 s of an 18.6 s,
150-iteration training.

With none of the variables set it trains like the default nnU-Net trainer (the paper's
setting). Environment variables are used because nnU-Net instantiates trainers
itself, by class name, with a fixed constructor signature (``plans,
configuration, fold, dataset_json, device``); the values actually used are
written to the training log and to ``debug.json`` in the fold folder.

Finding trainers. nnU-Net's ``nnUNetv2_train`` / ``nnUNetv2_predict`` find a
trainer by class name: they import every module under
``nnunetv2.training.nnUNetTrainer`` (then the folders in ``nnUNet_extTrainer``)
until one defines it. That walk imports ``primus/primus_trainers.py``, which
needs ``timm`` (a dependency of dynamic-network-architectures >= 0.4 that
minimal installs lack), so *any* trainer other than the top-level
``nnUNetTrainer`` fails to load there without ``timm``. :func:`train_entry`
is therefore the ``nnUNetv2_train`` equivalent for this package: it resolves
the class with :func:`resolve_trainer` and then runs nnU-Net's own
``maybe_load_checkpoint`` -> ``trainer.run_training()`` ->
``trainer.perform_actual_validation()``, exactly like
``nnunetv2.run.run_training.run_training`` does on one device.
:func:`ext_trainer_dir` writes an ``nnUNet_extTrainer`` folder for using the
stock CLIs on our models where ``timm`` is installed.
"""

import argparse
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.dataloading import data_loader as nnunet_data_loader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from threadpoolctl import ThreadpoolController

from .segmentation import (ENV_ITERATIONS, ENV_NUM_EPOCHS, ENV_SAVE_EVERY, ENV_SEED, ENV_VAL_ITERATIONS,
                           TRAINER_NAMES)

_SHIM_MODULE = "brainsynth_nnunet_trainers_shim"

# the decompressed cases one training keeps in memory; cases beyond it are read from disk each time
CASE_CACHE_BYTES = 2 * 1024**3


def _positive_int_from_env(name, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be a positive integer") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r} must be a positive integer")
    return value


def _seed_from_env(default=0):
    raw = os.environ.get(ENV_SEED)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() == "none":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {ENV_SEED}={raw!r} must be an integer or 'none'") from None


def seed_everything(seed, device):
    """Seed python, numpy and torch; deterministic torch algorithms on CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


class CachedCase(np.ndarray):
    """A case array kept in memory whose slices are copies, as blosc2's are: nnU-Net's loader
    turns an unpadded crop into a tensor sharing its memory and augments it in place, which
    would otherwise write into the cached case."""

    def __getitem__(self, index):
        return np.array(super().__getitem__(index))


class CaseCache:
    """The decompressed cases of one training, up to ``max_bytes``, shared by its training and
    validation datasets (fold 'all' validates on the training cases)."""

    def __init__(self, max_bytes=CASE_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.cached_bytes = 0
        self.cases = {}


def _nbytes(array):
    return 0 if array is None else int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize


class CasesInMemory:
    """An nnU-Net dataset whose ``load_case`` reads each case from disk once (while the cache has
    room; beyond it, nnU-Net's own arrays). The cached arrays hold the decompressed contents of
    what nnU-Net would open and their slices are copies (:class:`CachedCase`), so the loader cuts
    the same patches; the properties dict is shared (the loader only reads it)."""

    def __init__(self, dataset, cache=None):
        self.dataset = dataset
        self.cache = CaseCache() if cache is None else cache

    def __getattr__(self, name):
        dataset = self.__dict__.get("dataset")  # absent while unpickling
        if dataset is None:
            raise AttributeError(name)
        return getattr(dataset, name)

    def load_case(self, identifier):
        cache = self.cache
        if identifier in cache.cases:
            return cache.cases[identifier]
        data, seg, seg_prev, properties = self.dataset.load_case(identifier)
        size = sum(_nbytes(a) for a in (data, seg, seg_prev))  # from the headers, nothing decompressed
        if cache.cached_bytes + size > cache.max_bytes:
            return data, seg, seg_prev, properties
        arrays = [None if a is None else np.array(a[...]).view(CachedCase) for a in (data, seg, seg_prev)]
        cache.cached_bytes += size
        cache.cases[identifier] = (*arrays, properties)
        return cache.cases[identifier]


class _ThreadLimitOnce:
    """``threadpool_limits`` for nnU-Net's data loader, with the loaded libraries found once: a
    new ``threadpool_limits`` scans every loaded library (about 5 ms), and the loader makes one
    per batch."""

    _controller = None

    def __call__(self, limits=None, user_api=None):
        if _ThreadLimitOnce._controller is None:
            _ThreadLimitOnce._controller = ThreadpoolController()
        return _ThreadLimitOnce._controller.limit(limits=limits, user_api=user_api)


class nnUNetTrainerBrainsynth(nnUNetTrainer):
    """``nnUNetTrainer`` whose training length comes from ``BRAINSYNTH_NNUNET_*`` variables."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _positive_int_from_env(ENV_NUM_EPOCHS, self.num_epochs)
        self.num_iterations_per_epoch = _positive_int_from_env(ENV_ITERATIONS, self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _positive_int_from_env(ENV_VAL_ITERATIONS,
                                                                   self.num_val_iterations_per_epoch)
        self.save_every = _positive_int_from_env(ENV_SAVE_EVERY, self.save_every)
        self.brainsynth_seed = _seed_from_env()
        if self.brainsynth_seed is not None:
            seed_everything(self.brainsynth_seed, self.device)
        if os.environ.get(ENV_NUM_EPOCHS, "").strip():
            self._plot_progress_sparsely()
        self.print_to_log_file(
            f"brainsynth training length: num_epochs={self.num_epochs}, "
            f"num_iterations_per_epoch={self.num_iterations_per_epoch}, "
            f"num_val_iterations_per_epoch={self.num_val_iterations_per_epoch}, save_every={self.save_every}, "
            f"seed={self.brainsynth_seed}",
            also_print_to_console=True)

    def _plot_progress_sparsely(self):
        """Redraw progress.png every ``save_every`` epochs and after the last one, not after every
        epoch: in a short CPU training the redraw is 0.4 s of a 4 s epoch."""
        plot = self.logger.plot_progress_png

        def sparse(output_folder):
            epoch = self.current_epoch  # on_epoch_end draws before counting the epoch
            if (epoch + 1) % self.save_every == 0 or epoch + 1 >= self.num_epochs:
                plot(output_folder)

        self.logger.plot_progress_png = sparse

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets, each case read from disk once (:class:`CasesInMemory`) where the
        augmentation runs in this process (``nnUNet_n_proc_DA=0``, the workflow's CPU setting);
        augmentation workers would each hold a copy."""
        datasets = super().get_tr_and_val_datasets()
        if get_allowed_n_proc_DA() != 0:
            return datasets
        nnunet_data_loader.threadpool_limits = _ThreadLimitOnce()
        self.print_to_log_file(f"brainsynth: training cases read from disk once, kept in memory up to "
                               f"{CASE_CACHE_BYTES / 1024**3:g} GiB", also_print_to_console=True)
        cache = CaseCache()
        return tuple(CasesInMemory(d, cache) for d in datasets)

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's resume, with the checkpoint read as data (``weights_only=True``): nnU-Net's
        own ``load_checkpoint`` unpickles the file with ``weights_only=False``."""
        if isinstance(filename_or_checkpoint, (str, os.PathLike)):
            from .segmentation import load_nnunet_checkpoint

            filename_or_checkpoint = load_nnunet_checkpoint(filename_or_checkpoint)
        super().load_checkpoint(filename_or_checkpoint)


def ext_trainer_dir(folder):
    """Write a folder usable as ``nnUNet_extTrainer`` that exposes :data:`TRAINER_NAMES`.

    nnU-Net imports every module of an external trainer folder as a top-level
    module, so the folder holds a single shim that re-exports the classes from
    this (installed) module; the classes keep their identity and pickling path.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = ("# Written by brainsynth.nnunet_trainers.ext_trainer_dir; point nnUNet_extTrainer here.\n"
            f"from brainsynth.nnunet_trainers import {', '.join(TRAINER_NAMES)}  # noqa: F401\n")
    shim = folder / f"{_SHIM_MODULE}.py"
    if not shim.exists() or shim.read_text() != text:
        tmp = folder / f".{_SHIM_MODULE}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, shim)
    return folder


def resolve_trainer(name):
    """The trainer class called ``name``: ours, ``nnUNetTrainer``, or nnU-Net's by-name lookup."""
    if name in TRAINER_NAMES:
        return globals()[name]
    if name == "nnUNetTrainer":
        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except ModuleNotFoundError as e:
        raise RuntimeError(f"nnU-Net could not search its trainers for {name!r}: module {e.name!r} is missing "
                           f"(nnU-Net imports every trainer module while searching; install {e.name!r})") from e


def run_training(dataset_name_or_id, configuration, fold, trainer_name="nnUNetTrainerBrainsynth",
                 plans_identifier="nnUNetPlans", device="cpu", continue_training=False,
                 only_run_validation=False, export_validation_probabilities=False, final_validation=True):
    """Single-device ``nnunetv2.run.run_training.run_training`` with :func:`resolve_trainer`.

    Needs ``nnUNet_preprocessed`` and ``nnUNet_results`` in the environment.
    ``final_validation=False`` skips nnU-Net's closing prediction of the fold's
    validation cases (pointless for fold 'all', whose validation cases are the
    training cases). Returns the trainer's output folder (``.../fold_X``).
    """
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if fold != "all":
        fold = int(fold)
    if isinstance(dataset_name_or_id, str) and not dataset_name_or_id.startswith("Dataset"):
        dataset_name_or_id = int(dataset_name_or_id)
    device = torch.device(device) if isinstance(device, str) else device
    trainer_class = resolve_trainer(trainer_name)
    # == nnunetv2.run.run_training.get_trainer_from_args, minus the by-name class search
    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset_name_or_id))
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = continue_training
    dataset_json = load_json(join(folder, "dataset.json"))
    trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                            device=device)
    # == the single-device branch of nnunetv2.run.run_training.run_training
    assert not (continue_training and only_run_validation), "Cannot set --c and --val at the same time."
    maybe_load_checkpoint(trainer, continue_training, only_run_validation, None)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    if not only_run_validation:
        trainer.run_training()
    if final_validation or only_run_validation:
        trainer.perform_actual_validation(export_validation_probabilities)
    else:
        trainer.print_to_log_file("final validation skipped (brainsynth: final_validation=False)")
    return Path(trainer.output_folder)


def train_entry(argv=None):
    """``nnUNetv2_train``-compatible command line for :func:`run_training`."""
    p = argparse.ArgumentParser(description="nnUNetv2_train with brainsynth's trainer lookup")
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="nnUNetTrainerBrainsynth")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-device", default="cuda", choices=["cpu", "cuda", "mps"])
    p.add_argument("-threads", type=int, default=None,
                   help="torch CPU threads (default: like nnUNetv2_train, all CPUs on cpu, 1 on cuda)")
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--val", action="store_true", help="only run the final validation")
    p.add_argument("--npz", action="store_true", help="export validation probabilities")
    p.add_argument("--skip_final_validation", action="store_true",
                   help="do not predict the validation cases after training")
    a = p.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(a.threads or multiprocessing.cpu_count())
    elif a.device == "cuda":
        torch.set_num_threads(a.threads or 1)
        torch.set_num_interop_threads(1)
    run_training(a.dataset_name_or_id, a.configuration, a.fold, a.tr, a.p, a.device, a.c, a.val, a.npz,
                 final_validation=not a.skip_final_validation)
    return 0
