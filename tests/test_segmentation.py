"""nnU-Net v2 dataset assembly, planning, training and inference (brainsynth.segmentation).

The fast tests cover dataset assembly and plans derivation. The slow test runs
real nnU-Net end to end on CPU on a tiny learnable dataset: plan + preprocess
(2d and 3d_fullres, small derived plans), a short 3D training (fold 0, with
nnU-Net's final validation) and a very short 2D training (fold 'all'), then
predicts held-out 3D volumes with both models.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsynth import segmentation as seg
from brainsynth.errors import InputError

SHAPE = (24, 24, 24)
LABELS = {"background": 0, "ball": 1, "core": 2}
CHANNELS = {"t1": "t1", "t2": "t2"}


def _affine():
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-24.0, -20.0, -10.0]
    return aff


def make_cases(folder, n, seed=0, with_label=True, prefix="case"):
    """Noisy two-channel volumes: a big ball (label 1) with a small core (label 2)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    cases = []
    for i in range(n):
        c = rng.integers(10, 14, 3)
        r = rng.uniform(6.0, 8.0)
        d2 = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        lab = np.zeros(SHAPE, np.uint8)
        lab[d2 < r * r] = 1
        lab[d2 < 9] = 2
        cid = f"{prefix}{i:02d}"
        images = {}
        for ch, (v1, v2) in {"t1": (1.0, 3.0), "t2": (2.0, 0.5)}.items():
            img = (lab == 1) * v1 + (lab == 2) * v2 + rng.normal(0.0, 0.3, SHAPE)
            path = folder / f"{cid}_{ch}.nii.gz"
            nib.save(nib.Nifti1Image(img.astype(np.float32), _affine()), path)
            images[ch] = path
        case = {"case_id": cid, "images": images}
        lab_path = folder / f"{cid}_seg.nii.gz"
        nib.save(nib.Nifti1Image(lab, _affine()), lab_path)
        if with_label:
            case["label"] = lab_path
        else:
            case["truth"] = lab_path
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------- fast
def test_assemble_dataset_symlinks_and_json(tmp_path):
    cases = make_cases(tmp_path / "src", 3)
    tests = make_cases(tmp_path / "src_ts", 1, seed=5, with_label=False, prefix="test")
    raw = tmp_path / "arm" / "nnUNet_raw"
    out = seg.assemble_dataset(cases, 7, "Toy", CHANNELS, LABELS, raw,
                               test_cases=[{"case_id": t["case_id"], "images": t["images"]} for t in tests])
    assert out == raw / "Dataset007_Toy"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "t1", "1": "t2"}
    assert dj["labels"] == LABELS
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    for case in cases:
        for i, ch in enumerate(("t1", "t2")):
            link = out / "imagesTr" / f"{case['case_id']}_{i:04d}.nii.gz"
            assert link.is_symlink() and not os.path.isabs(os.readlink(link))
            assert link.resolve() == case["images"][ch].resolve()
        lab = out / "labelsTr" / f"{case['case_id']}.nii.gz"
        assert lab.is_symlink() and lab.resolve() == case["label"].resolve()
    assert (out / "imagesTs" / "test00_0001.nii.gz").resolve() == tests[0]["images"]["t2"].resolve()

    # re-running replaces the dataset cleanly (no leftovers, no temp folders)
    out2 = seg.assemble_dataset(cases[:2], 7, "Toy", CHANNELS, LABELS, raw, relative_links=False)
    assert out2 == out
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case00.nii.gz", "case01.nii.gz"]
    assert not (out / "imagesTs").exists()
    assert os.path.isabs(os.readlink(out / "labelsTr" / "case00.nii.gz"))
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_Toy"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_assemble_dataset_rejects_bad_input(tmp_path):
    cases = make_cases(tmp_path / "src", 2)
    raw = tmp_path / "raw"
    with pytest.raises(InputError, match="consecutive"):
        seg.assemble_dataset(cases, 7, "Toy", CHANNELS, {"background": 0, "a": 2}, raw)
    with pytest.raises(InputError, match="lacks channels"):
        seg.assemble_dataset(cases, 7, "Toy", {**CHANNELS, "flair": "flair"}, LABELS, raw)
    with pytest.raises(InputError, match="1..999"):
        seg.assemble_dataset(cases, 1000, "Toy", CHANNELS, LABELS, raw)
    bad = [dict(cases[0], label=tmp_path / "missing.nii.gz")]
    with pytest.raises(InputError, match="file missing"):
        seg.assemble_dataset(bad, 7, "Toy", CHANNELS, LABELS, raw)
    seg.assemble_dataset(cases, 7, "Toy", CHANNELS, LABELS, raw)
    with pytest.raises(InputError, match="already used"):
        seg.assemble_dataset(cases, 7, "Other", CHANNELS, LABELS, raw)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset007_Toy"]


def _plans_3d():
    return {
        "dataset_name": "Dataset007_Toy", "plans_name": "nnUNetPlans",
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [48, 56, 48],
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": 4, "features_per_stage": [32, 64, 128, 256],
                        "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                        "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2]}}},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }


def test_derive_plans_shrinks_network(tmp_path):
    src = tmp_path / "nnUNetPlans.json"
    src.write_text(json.dumps(_plans_3d()))
    out = seg.derive_plans(src, "nnUNetPlansDemo", {"base_features": 4, "max_features": 16, "max_stages": 3,
                                                    "batch_size": 1, "n_conv_per_stage": 1},
                           configurations=["3d_fullres"])
    assert out == tmp_path / "nnUNetPlansDemo.json"
    p = json.loads(out.read_text())
    c = p["configurations"]["3d_fullres"]
    kw = c["architecture"]["arch_kwargs"]
    assert p["plans_name"] == "nnUNetPlansDemo" and c["data_identifier"] == "nnUNetPlansDemo_3d_fullres"
    assert kw["n_stages"] == 3 and kw["features_per_stage"] == [4, 8, 16]
    assert len(kw["kernel_sizes"]) == len(kw["strides"]) == 3 and kw["n_conv_per_stage_decoder"] == [1, 1]
    assert kw["n_conv_per_stage"] == [1, 1, 1] and c["batch_size"] == 1
    assert json.loads(src.read_text())["plans_name"] == "nnUNetPlans"  # source untouched
    with pytest.raises(InputError, match="divisible"):
        seg.derive_plans(src, "nnUNetPlansBad", {"patch_size": [48, 50, 48]}, configurations=["3d_fullres"])
    with pytest.raises(InputError, match="unknown plans override"):
        seg.derive_plans(src, "nnUNetPlansBad", {"3d_fullres": {"n_features": 3}})


# ----------------------------------------------------------------------------- slow
def _dice(a, b, c):
    a, b = a == c, b == c
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
def test_nnunet_plan_train_predict_end_to_end(tmp_path):
    train_cases = make_cases(tmp_path / "src", 6, seed=1)
    test_cases = make_cases(tmp_path / "src_ts", 2, seed=99, with_label=False, prefix="test")
    roots = seg.NnunetRoots.under(tmp_path / "arm")
    seg.assemble_dataset(train_cases, 11, "Toy", CHANNELS, LABELS, roots.raw)

    log = tmp_path / "nnunet.log"
    plans_file = seg.plan_and_preprocess(11, roots, configurations=("3d_fullres", "2d"), num_processes=1,
                                         plans_overrides=seg.DEMO_PLANS_OVERRIDES, threads=1, log=log)
    pp = roots.preprocessed / "Dataset011_Toy"
    assert plans_file == pp / "nnUNetPlansDemo.json"
    plans = json.loads(plans_file.read_text())
    for conf in ("3d_fullres", "2d"):
        feats = plans["configurations"][conf]["architecture"]["arch_kwargs"]["features_per_stage"]
        assert max(feats) <= 64 and feats[0] == 8
        assert (pp / f"nnUNetPlansDemo_{conf}").is_dir()  # nnU-Net's preprocessed cases
    assert (pp / "dataset_fingerprint.json").is_file() and (pp / "nnUNetPlans.json").is_file()

    # 3D: nnU-Net's 5-fold split, fold 0, with nnU-Net's final validation
    m3d = seg.train(11, roots, configuration="3d_fullres", fold=0, plans=seg.DEMO_PLANS, epochs=4,
                    iterations_per_epoch=10, val_iterations_per_epoch=2, device="cpu", n_proc_da=0,
                    threads=1, log=log)
    assert m3d == roots.results / "Dataset011_Toy" / "nnUNetTrainerBrainsynth__nnUNetPlansDemo__3d_fullres"
    fold0 = m3d / "fold_0"
    for f in ("checkpoint_final.pth", "debug.json", "progress.png"):
        assert (fold0 / f).is_file(), f
    assert (m3d / "plans.json").is_file() and (m3d / "dataset.json").is_file()
    assert (fold0 / "validation" / "summary.json").is_file()
    train_log = next(fold0.glob("training_log_*.txt")).read_text()
    assert "num_epochs=4, num_iterations_per_epoch=10" in train_log and "Epoch 3" in train_log
    assert "training cases read from disk once" in train_log  # augmentation in the training process
    assert json.loads((m3d / "plans.json").read_text())["plans_name"] == "nnUNetPlansDemo"
    assert (pp / "splits_final.json").is_file()

    inputs = [{"case_id": c["case_id"], "images": c["images"]} for c in test_cases]
    pred = seg.predict(m3d, inputs, tmp_path / "pred3d", device="cpu", threads=1)
    assert sorted(pred) == ["test00", "test01"]
    dices = []
    for c in test_cases:
        out = nib.load(pred[c["case_id"]])
        ref = nib.load(c["images"]["t1"])
        assert out.shape == SHAPE and np.allclose(out.affine, ref.affine, atol=1e-4)
        seg_arr = np.asarray(out.dataobj)
        assert set(np.unique(seg_arr)) <= set(LABELS.values())
        dices.append(_dice(seg_arr, np.asarray(nib.load(c["truth"]).dataobj), 1))
    # the ball fills ~7% of the volume: chance-level Dice is ~0.07
    assert np.mean(dices) > 0.5, dices

    # 2D: trained on slices, predicts 3D volumes (fold 'all', no final validation); one
    # augmentation worker, which reads the cases from disk itself
    m2d = seg.train(11, roots, configuration="2d", fold="all", plans=seg.DEMO_PLANS, epochs=1,
                    iterations_per_epoch=3, val_iterations_per_epoch=1, device="cpu", n_proc_da=1, threads=1,
                    final_validation=False, log=log)
    assert (m2d / "fold_all" / "checkpoint_final.pth").is_file()
    assert "read from disk once" not in next((m2d / "fold_all").glob("training_log_*.txt")).read_text()
    assert not (m2d / "fold_all" / "validation").exists()
    pred2 = seg.predict(m2d, inputs[:1], tmp_path / "pred2d", device="cpu", threads=1)
    out = nib.load(pred2["test00"])
    assert out.shape == SHAPE and np.allclose(out.affine, _affine(), atol=1e-4)
    assert set(np.unique(np.asarray(out.dataobj))) <= set(LABELS.values())
    assert "nnUNetv2_preprocess exit code 0" in log.read_text()


def test_ext_trainer_dir_is_found_by_nnunet_lookup(tmp_path):
    """The nnUNet_extTrainer shim works with nnU-Net's own external-folder search."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from brainsynth.nnunet_trainers import ext_trainer_dir, nnUNetTrainerBrainsynth, resolve_trainer

    folder = str(ext_trainer_dir(tmp_path / "ext"))
    # the call nnunetv2.utilities.find_objects makes for each nnUNet_extTrainer folder
    cls = recursive_find_python_class(folder, seg.TRAINER, None, base_folder=folder,
                                      cleanup_imports_from_base_folder=True)
    assert cls is nnUNetTrainerBrainsynth and issubclass(cls, nnUNetTrainer)
    assert resolve_trainer(seg.TRAINER) is nnUNetTrainerBrainsynth
    assert resolve_trainer("nnUNetTrainer") is nnUNetTrainer


def test_train_rejects_length_for_foreign_trainer(tmp_path):
    with pytest.raises(InputError, match="only be set"):
        seg.train(5, tmp_path, trainer="nnUNetTrainer_5epochs", epochs=3)


def _counting_blosc2_dataset(folder):
    """nnU-Net's blosc2 dataset of ``folder``, counting the cases it reads from disk in ``reads``."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    class Counting(nnUNetDatasetBlosc2):
        def load_case(self, identifier):
            self.reads[identifier] = self.reads.get(identifier, 0) + 1
            return super().load_case(identifier)

    ds = Counting(str(folder))
    ds.reads = {}
    return ds


def _blosc2_cases(folder, n=2):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    rng = np.random.default_rng(3)
    for i in range(n):
        data = rng.normal(size=(2, 6, 10, 8)).astype(np.float32)
        segm = rng.integers(0, 3, (1, 6, 10, 8)).astype(np.int8)
        nnUNetDatasetBlosc2.save_case(data, segm, {"case": i}, str(folder / f"case{i}"),
                                      chunks=data.shape, blocks=data.shape, chunks_seg=segm.shape,
                                      blocks_seg=segm.shape)


ONE_CASE_BYTES = 2 * 6 * 10 * 8 * 4 + 6 * 10 * 8


def test_cases_in_memory_reads_each_case_once_and_gives_the_same_patches(tmp_path):
    import pickle

    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from brainsynth.nnunet_trainers import CaseCache, CasesInMemory

    _blosc2_cases(tmp_path)
    plain, counted = _counting_blosc2_dataset(tmp_path), _counting_blosc2_dataset(tmp_path)
    cache = CaseCache()
    cached, validation = CasesInMemory(counted, cache), CasesInMemory(counted, cache)
    assert sorted(cached.identifiers) == ["case0", "case1"]  # the wrapped dataset's attributes
    padded = [[-1, 5], [2, 12], [3, 7]]  # reaches past the border: padded like nnU-Net's loader pads
    inside = [[1, 5], [2, 8], [0, 8]]  # within the case: nnU-Net's crop is a slice of the array
    for _ in range(3):
        for wrapper in (cached, validation):  # one cache for training and validation
            for cid in ("case0", "case1"):
                data, segm, prev, props = wrapper.load_case(cid)
                ref_data, ref_seg, _, ref_props = plain.load_case(cid)
                assert isinstance(data, np.ndarray) and prev is None and props == ref_props
                assert np.array_equal(data, ref_data[...]) and np.array_equal(segm, ref_seg[...])
                for bbox in (padded, inside):
                    patch = crop_and_pad_nd(data, bbox, 0)
                    assert np.array_equal(patch, crop_and_pad_nd(ref_data, bbox, 0))
                    # the loader's augmentation works in place on the tensor of its crop
                    torch.from_numpy(patch).mul_(0.5).add_(7.0)
    assert counted.reads == {"case0": 1, "case1": 1}
    assert cache.cached_bytes == 2 * ONE_CASE_BYTES
    copy = pickle.loads(pickle.dumps(CasesInMemory(nnUNetDatasetBlosc2(str(tmp_path)))))
    assert sorted(copy.identifiers) == ["case0", "case1"] and np.array_equal(copy.load_case("case1")[0], data)


def test_cases_in_memory_reads_from_disk_beyond_its_budget(tmp_path):
    from brainsynth.nnunet_trainers import CaseCache, CasesInMemory

    _blosc2_cases(tmp_path)
    counted = _counting_blosc2_dataset(tmp_path)
    cached = CasesInMemory(counted, CaseCache(max_bytes=ONE_CASE_BYTES))
    for _ in range(2):
        assert isinstance(cached.load_case("case0")[0], np.ndarray)
        assert not isinstance(cached.load_case("case1")[0], np.ndarray)  # over budget: nnU-Net's own array
    assert counted.reads == {"case0": 1, "case1": 2} and cached.cache.cached_bytes == ONE_CASE_BYTES


def test_data_loader_thread_limit_finds_libraries_once():
    from threadpoolctl import threadpool_info

    from brainsynth.nnunet_trainers import _ThreadLimitOnce

    limit = _ThreadLimitOnce()
    with limit(limits=1, user_api=None):
        inside = threadpool_info()
    controller = _ThreadLimitOnce._controller
    with _ThreadLimitOnce()(limits=1, user_api=None):
        pass
    assert controller is not None and _ThreadLimitOnce._controller is controller
    assert inside and all(lib["num_threads"] == 1 for lib in inside)
