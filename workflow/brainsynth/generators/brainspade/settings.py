"""The label generator's settings per lesion type, checked without torch: the workflow checks them
when it starts, so a misspelt lesion type costs no training, and the trainer and the sampler check
what they are given again."""

from __future__ import annotations

from ...errors import InputError


def lesion_type_weights(value, lesion_types, field, *, minimum, inclusive, default, owner, fix):
    """``value``, a number for every lesion type or a mapping ``{type: number}`` whose missing types
    take ``default``, as ``{type: float}`` in ``lesion_types`` order. Refused, naming ``field``,
    when a key is not one of ``lesion_types`` (those of ``owner``) or a value is not a number above
    ``minimum`` (or equal to it, when ``inclusive``)."""
    name = field.removeprefix("label_generator.")
    given = value if isinstance(value, dict) else {t: value for t in lesion_types}
    unknown = sorted(set(given) - set(lesion_types))
    if unknown:
        raise InputError(f"{name} names lesion types {unknown} that {owner} does not have "
                         f"(its types: {list(lesion_types)})", field=field, fix=fix)
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    for k in given.values():
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k < minimum or (k == minimum and not inclusive):
            raise InputError(f"{name} must be a number {bound} or a mapping of lesion types to such numbers, "
                             f"got {value!r}", field=field, fix=fix)
    return {t: float(given.get(t, default)) for t in lesion_types}


def loss_weights(value, lesion_types):
    """``ldm.lesion_weight`` per lesion type of the label schema (a type left out: 0, plain L2)."""
    return lesion_type_weights(value, lesion_types, "label_generator.ldm.lesion_weight", minimum=0,
                               inclusive=True, default=0.0, owner="the label schema",
                               fix="use e.g. 10, or {wmh: 10, tumour: 0}")


#: ``sampling.compose_weight`` fitted per trained model (rule fit_compose_weight) instead of given
FIT = "fit"


def compose_weights(value, lesion_types):
    """``sampling.compose_weight`` per lesion type of the LDM (a type left out: 1); ``fit`` is
    resolved to the fitted weights before sampling (``label_generator.resolve_compose_weight``)."""
    if value == FIT:
        raise InputError("compose_weight: fit reached sampling without the fitted weights",
                         field="label_generator.sampling.compose_weight",
                         fix="sample through the workflow (rule fit_compose_weight fits them), or pass "
                             "the fitted file (fit_compose_weight's output)")
    return lesion_type_weights(value, lesion_types, "label_generator.sampling.compose_weight", minimum=0,
                               inclusive=False, default=1.0, owner="the LDM",
                               fix="use e.g. 1, or {wmh: 1.5}")


def check_settings(cfg, lesion_types):
    """Check the per-lesion-type settings ``cfg`` (the config's ``label_generator`` section) gives,
    against the label schema's lesion types (those the LDM trains on), and the sampling fits it asks
    for, before any work."""
    ldm, sampling = cfg.get("ldm") or {}, cfg.get("sampling") or {}
    if "lesion_weight" in ldm:
        loss_weights(ldm["lesion_weight"], lesion_types)
    if "compose_weight" in sampling and sampling["compose_weight"] != FIT:
        compose_weights(sampling["compose_weight"], lesion_types)
    if fits_deformation(cfg) and int(cfg.get("spatial_dims", 3)) != 3:
        raise InputError("deformation: fit needs a 3-D label generator: its fit compares sampled volumes with "
                         "the training volumes, which a 2-D generator's slices are not",
                         field="label_generator.sampling.deformation", fix="use deformation: none, or spatial_dims: 3")


def fits_compose_weight(cfg, lesion_types):
    """Whether the compose weights of ``cfg`` (the ``label_generator`` section) are fitted: ``fit``
    and something to compose (``compose_lesion_types`` on, two or more lesion types)."""
    sampling = cfg.get("sampling") or {}
    return (sampling.get("compose_weight") == FIT and bool(sampling.get("compose_lesion_types", False))
            and len(lesion_types) > 1)


#: ``sampling.tissue_offsets`` and ``sampling.deformation``: ``fit`` (rule fit_label_sampling) or ``none``
SAMPLING_FITS = ("none", FIT)


def _fits(cfg, key):
    value = (cfg.get("sampling") or {}).get(key, "none")
    if value not in SAMPLING_FITS:
        raise InputError(f"{key} must be one of {list(SAMPLING_FITS)}, got {value!r}",
                         field=f"label_generator.sampling.{key}", fix="use fit or none")
    return value == FIT


def fits_tissue_offsets(cfg):
    """Whether sampling decodes with tissue offsets fitted on the trained label generator
    (``sampling.tissue_offsets: fit`` in ``cfg``, the ``label_generator`` section)."""
    return _fits(cfg, "tissue_offsets")


def fits_deformation(cfg):
    """Whether each sampled map is warped by a random smooth field of a size fitted on the trained
    label generator (``sampling.deformation: fit`` in ``cfg``, the ``label_generator`` section)."""
    return _fits(cfg, "deformation")


def fits_sampling_calibration(cfg):
    """Whether rule fit_label_sampling runs: tissue offsets or the deformation fitted."""
    return fits_tissue_offsets(cfg) or fits_deformation(cfg)


def sampling_settings(cfg, lesion_types):
    """``cfg``'s ``sampling`` as the sampler takes it: ``compose_weight: fit`` with nothing to
    compose (composition off, or one lesion type) is the plain weight 1, and nothing is fitted."""
    sampling = dict(cfg.get("sampling") or {})
    if sampling.get("compose_weight") == FIT and not fits_compose_weight(cfg, lesion_types):
        sampling["compose_weight"] = 1.0
    return sampling
