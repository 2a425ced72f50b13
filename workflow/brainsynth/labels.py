"""The label schema: class names, values, lesion types.

The schema lives in ``config.yaml`` under ``labels``; this module turns it
into the index arrays the preprocessing, generators and nnU-Net datasets use.
Class values are contiguous 0..K-1 with 0 the background, so a label map can
be one-hot encoded with the value as channel index.
"""

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

DEFAULT_CLASSES = {
    "background": 0,
    "csf": 1,
    "gm": 2,
    "wm": 3,
    "deep_gm": 4,
    "brainstem": 5,
    "wmh": 6,
    "necrotic": 7,
    "oedema": 8,
    "enhancing": 9,
}
DEFAULT_TISSUES = ["csf", "gm", "wm", "deep_gm", "brainstem"]
DEFAULT_LESION_TYPES = {"wmh": ["wmh"], "tumour": ["necrotic", "oedema", "enhancing"]}

# conditioning of synthetic label maps; besides these, ``<lesion type>_only`` (e.g. tumour_only)
CONDITIONING_MODES = ("random", "unseen", "healthy", "explicit")


def single_type_modes(lesion_types):
    """``<lesion type>_only`` per lesion type: conditioning for a set of cases of one disease."""
    return [f"{t}_only" for t in lesion_types]


def single_type_of(mode):
    """The lesion type a ``<lesion type>_only`` mode names (None for the other modes)."""
    return mode[:-len("_only")] if mode.endswith("_only") else None


def check_conditioning_mode(mode, lesion_types, field="conditioning.mode"):
    """Refuse a conditioning mode that is neither one of :data:`CONDITIONING_MODES` nor
    ``<lesion type>_only`` for a lesion type of the schema (checked when the DAG is built)."""
    single = single_type_modes(lesion_types)
    if mode not in CONDITIONING_MODES and mode not in single:
        raise InputError(f"unknown conditioning mode {mode!r}", field=field,
                         fix=f"use one of {list(CONDITIONING_MODES) + single}")


@dataclass(frozen=True)
class LabelSchema:
    classes: dict = field(default_factory=lambda: dict(DEFAULT_CLASSES))
    tissues: list = field(default_factory=lambda: list(DEFAULT_TISSUES))
    lesion_types: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_LESION_TYPES.items()})

    def __post_init__(self):
        values = sorted(self.classes.values())
        if values != list(range(len(values))):
            raise InputError(
                f"label values must be 0..{len(values) - 1} without gaps, got {values}",
                field="labels.classes",
                fix="number the classes contiguously from 0 (background)",
            )
        if self.classes.get("background") != 0:
            raise InputError("class 'background' must have value 0", field="labels.classes",
                             fix="add 'background: 0'")
        named = set(self.tissues) | {c for cs in self.lesion_types.values() for c in cs}
        unknown = named - set(self.classes)
        if unknown:
            raise InputError(f"classes {sorted(unknown)} are used but not declared",
                             field="labels", fix="declare them under labels.classes")

    @classmethod
    def from_config(cls, config):
        lab = (config or {}).get("labels") or {}
        return cls(
            classes=dict(lab.get("classes", DEFAULT_CLASSES)),
            tissues=list(lab.get("tissues", DEFAULT_TISSUES)),
            lesion_types={k: list(v) for k, v in lab.get("lesion_types", DEFAULT_LESION_TYPES).items()},
        )

    @property
    def n_classes(self):
        return len(self.classes)

    @property
    def names(self):
        """Class names ordered by value."""
        return [n for n, _ in sorted(self.classes.items(), key=lambda kv: kv[1])]

    @property
    def values(self):
        return sorted(self.classes.values())

    @property
    def lesion_classes(self):
        return [c for cs in self.lesion_types.values() for c in cs]

    @property
    def lesion_type_values(self):
        """``{lesion type: its classes' label values}``."""
        return {t: [self.classes[c] for c in cs] for t, cs in self.lesion_types.items()}

    def value(self, name):
        return self.classes[name]

    def lesion_type_mask(self, label, lesion_type):
        """Boolean mask of voxels belonging to any class of ``lesion_type``."""
        return np.isin(label, self.lesion_type_values[lesion_type])

    def lesion_counts(self, label):
        """Voxel count per lesion type (the numerator of dc_jl)."""
        return {lt: int(self.lesion_type_mask(label, lt).sum()) for lt in self.lesion_types}

    def one_hot(self, label):
        """(K, *shape) float32 one-hot encoding with channel = class value."""
        label = np.asarray(label)
        out = np.zeros((self.n_classes,) + label.shape, dtype=np.float32)
        for v in self.values:
            out[v] = label == v
        return out
