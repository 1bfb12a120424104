"""The realistic BraTS phantom generator: MNI152 anatomy, contrasts, tumour labels, BraTS-layout NIfTI datasets."""
import json
import os
import socket
import subprocess

import numpy as np
import pytest

pytest.importorskip("nilearn")
pytest.importorskip("scipy")
nib = pytest.importorskip("nibabel")

from shaspec_tf import fileio  # noqa: E402
from shaspec_tf.cli import main  # noqa: E402
from shaspec_tf.data import phantom  # noqa: E402
from shaspec_tf.data.phantom import (  # noqa: E402
    DEFAULT_SHAPE, make_phantom_case, phantom_affine, phantom_case_seed, write_phantom_dataset)

BRATS = ("flair", "t1", "t1ce", "t2")
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def cases():
    """Four default-size cases with their ground-truth anatomy: seed -> (volumes, labels, affine, maps)."""
    return {seed: make_phantom_case(seed, return_maps=True) for seed in SEEDS}


def _normal_wm(labels, maps):
    return (maps["wm"] > 0.9) & (labels == 0)


def _load(path):
    img = nib.load(str(path))
    return img, img.get_fdata().transpose(2, 1, 0)


def test_templates_come_from_nilearn_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    phantom.anatomy._mni_templates.cache_clear()
    t1, gm, wm, mask = phantom.anatomy._mni_templates()
    assert t1.shape == gm.shape == wm.shape == mask.shape
    # The MNI152 brain (1 mm voxels, cropped to the mask): about 145 x 181 x 155 mm (W, H, D) and 1.9 litres.
    assert 150 <= t1.shape[0] <= 165 and 180 <= t1.shape[1] <= 190 and 145 <= t1.shape[2] <= 155
    assert 1.7e6 < mask.sum() < 2.1e6
    brain = mask > 0
    assert np.median(t1[brain & (wm > 0.9)]) > np.median(t1[brain & (gm > 0.9)])   # a real T1 contrast


def test_shapes_dtypes_and_affines(cases):
    volumes, labels, affine, maps = cases[0]
    assert tuple(volumes) == BRATS
    for name, volume in volumes.items():
        assert volume.shape == DEFAULT_SHAPE and volume.dtype == np.float32, name
    assert labels.shape == DEFAULT_SHAPE and labels.dtype == np.uint8
    d, h, w = DEFAULT_SHAPE
    np.testing.assert_allclose(np.diag(affine), [240 / w, 240 / h, 155 / d, 1.0])   # NIfTI i, j, k = W, H, D
    assert np.count_nonzero(affine[:3, :3] - np.diag(np.diag(affine)[:3])) == 0                   # diagonal
    full = phantom_affine((155, 240, 240))
    np.testing.assert_allclose(full[:3, :3], np.eye(3))                              # 1 mm at BraTS size
    np.testing.assert_allclose(full[:3, :3] @ np.array([239, 239, 154]) / 2 + full[:3, 3], 0.0)   # centred


def test_labels_are_brats_and_all_three_sub_regions_present(cases):
    for seed, (_, labels, _, maps) in cases.items():
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}, seed
        counts = {v: int(np.sum(labels == v)) for v in (1, 2, 4)}
        assert all(c >= 10 for c in counts.values()), (seed, counts)
        # The rim encloses the necrosis: no necrotic voxel touches healthy tissue or oedema along an axis.
        nec = labels == 1
        for axis in range(3):
            for shift in (1, -1):
                neighbour = np.roll(labels, shift, axis=axis)[nec]
                assert np.all((neighbour == 1) | (neighbour == 4)), (seed, axis, shift)


def test_tumour_inside_brain_and_background_exactly_zero(cases):
    for seed, (volumes, labels, _, maps) in cases.items():
        brain = maps["brain"]
        assert not np.any(labels[~brain]), seed
        for name, volume in volumes.items():
            assert np.all(volume[~brain] == 0.0), (seed, name)
            assert np.all(volume[brain] >= 1.0), (seed, name)          # the brain is exactly the non-zero voxels
            assert np.array_equal(volume, np.rint(volume)), (seed, name)  # integer, int16-safe values
            assert volume.max() < 32768 and 100 < np.median(volume[brain]) < 3000, (seed, name)
        # A realistic brain: 0.7-1.9 litres, about 30 % white matter, the tumour mostly in white matter.
        litres = brain.sum() * np.prod(phantom.phantom_spacing(DEFAULT_SHAPE)) / 1e6
        assert 0.7 < litres < 1.9, (seed, litres)
        assert 0.2 < np.mean(maps["wm"][brain] > 0.5) < 0.45, seed
        assert np.mean(maps["wm"][labels == 2] > 0.5) > np.mean(maps["wm"][brain] > 0.5) + 0.1, seed
    # The core sits in (pushed-aside) white matter: placement prefers deep white matter.
    core_wm = [maps["wm"][(labels == 1) | (labels == 4)].mean() for _, labels, _, maps in cases.values()]
    assert np.mean(core_wm) > 0.5, core_wm


def test_normal_tissue_contrasts(cases):
    for seed, (volumes, labels, _, maps) in cases.items():
        healthy = labels == 0
        mean = {t: {m: float(v[(maps[t] > 0.9) & healthy].mean()) for m, v in volumes.items()}
                for t in ("gm", "wm", "csf")}
        assert mean["wm"]["t1"] > mean["gm"]["t1"] > mean["csf"]["t1"], seed
        assert mean["csf"]["t2"] > mean["gm"]["t2"] > mean["wm"]["t2"], seed
        assert mean["gm"]["flair"] > mean["wm"]["flair"] > mean["csf"]["flair"], seed   # CSF suppressed
        # Noise and bias: pure white matter is not flat.
        wm = volumes["t1"][_normal_wm(labels, maps)]
        assert wm.std() / wm.mean() > 0.01, seed


def test_same_seed_same_case_and_drops_leave_the_rest_unchanged(cases):
    volumes, labels, affine, _ = cases[2]
    again, labels_again, affine_again = make_phantom_case(2)
    assert np.array_equal(labels, labels_again) and np.array_equal(affine, affine_again)
    for name in BRATS:
        assert np.array_equal(volumes[name], again[name]), name
    partial, labels_partial, _ = make_phantom_case(2, drop=("t1", "t2"))
    assert tuple(partial) == ("flair", "t1ce")
    assert np.array_equal(labels_partial, labels)
    for name in partial:
        assert np.array_equal(partial[name], volumes[name]), name


def test_different_seeds_differ(cases):
    (v0, l0, _, m0), (v1, l1, _, m1) = cases[0], cases[1]
    assert not np.array_equal(l0, l1)
    assert not np.array_equal(m0["brain"], m1["brain"])          # random deformation of the anatomy
    for name in BRATS:
        assert not np.array_equal(v0[name], v1[name]), name


def test_enhancing_rim_is_bright_in_t1ce_only(cases):
    for seed, (volumes, labels, _, maps) in cases.items():
        brain, enhancing = maps["brain"], labels == 4
        ratio = {m: volumes[m][enhancing].mean() / np.median(volumes[m][brain]) for m in BRATS}
        assert ratio["t1ce"] > 1.2 * max(ratio["t1"], ratio["flair"], ratio["t2"]), (seed, ratio)
        assert ratio["t1ce"] > 1.5, (seed, ratio)
        # Without T1ce the rim looks like the oedema in T1: the information is really lost.
        t1, t1ce = volumes["t1"], volumes["t1ce"]
        gap_t1 = abs(t1[enhancing].mean() - t1[labels == 2].mean()) / t1[enhancing].mean()
        gap_t1ce = abs(t1ce[enhancing].mean() - t1ce[labels == 2].mean()) / t1ce[enhancing].mean()
        assert gap_t1ce > 3 * gap_t1, (seed, gap_t1, gap_t1ce)


def test_oedema_is_bright_in_flair_and_t2(cases):
    for seed, (volumes, labels, _, maps) in cases.items():
        wm, oedema = _normal_wm(labels, maps), labels == 2
        for name, factor in (("flair", 1.4), ("t2", 1.2)):
            assert volumes[name][oedema].mean() > factor * volumes[name][wm].mean(), (seed, name)
        assert volumes["t1"][oedema].mean() < volumes["t1"][wm].mean(), seed


def test_necrosis_is_dark_in_t1_and_t1ce(cases):
    for seed, (volumes, labels, _, maps) in cases.items():
        necrosis, enhancing, wm = labels == 1, labels == 4, _normal_wm(labels, maps)
        assert volumes["t1ce"][necrosis].mean() < 0.65 * volumes["t1ce"][enhancing].mean(), seed
        assert volumes["t1"][necrosis].mean() < 0.65 * volumes["t1"][wm].mean(), seed


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown sequences"):
        make_phantom_case(0, drop=("dwi",))
    with pytest.raises(ValueError, match="shape"):
        make_phantom_case(0, shape=(8, 64, 64))
    with pytest.raises(ValueError, match="drop_rate"):
        write_phantom_dataset(tmp_path, 1, drop_rate=1.5, progress=False)


def test_written_nifti_match_the_arrays(tmp_path):
    manifest = write_phantom_dataset(tmp_path, 2, seed=5, progress=False)
    assert sorted(os.listdir(tmp_path)) == [fileio.MARKER, "Phantom_0000", "Phantom_0001", "phantoms.json"]
    assert fileio.read_marker(str(tmp_path))["files"] == fileio.list_files(str(tmp_path))   # ours, all listed
    volumes, labels, affine = make_phantom_case(phantom_case_seed(5, 1))
    case = tmp_path / "Phantom_0001"
    assert sorted(os.listdir(case)) == sorted(f"Phantom_0001_{s}.nii.gz" for s in BRATS + ("seg",))
    for name in BRATS:
        img, data = _load(case / f"Phantom_0001_{name}.nii.gz")
        assert img.shape == DEFAULT_SHAPE[::-1] and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, affine)
        np.testing.assert_allclose(img.header.get_zooms(), np.diag(affine)[:3], rtol=1e-6)
        assert np.array_equal(data.astype(np.float32), volumes[name]), name      # exact: integer values
    img, seg = _load(case / "Phantom_0001_seg.nii.gz")
    assert img.get_data_dtype() == np.uint8 and np.array_equal(seg.astype(np.uint8), labels)
    on_disk = json.loads((tmp_path / "phantoms.json").read_text())
    assert on_disk == manifest
    assert on_disk["seed"] == 5 and on_disk["shape"] == list(DEFAULT_SHAPE) and on_disk["num_cases"] == 2
    assert [c["case_id"] for c in on_disk["cases"]] == ["Phantom_0000", "Phantom_0001"]
    assert all(c["dropped"] == [] and c["present"] == list(BRATS) for c in on_disk["cases"])
    assert on_disk["cases"][1]["label_voxels"] == {str(v): int(np.sum(labels == v)) for v in (1, 2, 4)}


def test_case_k_is_the_same_whatever_the_number_of_cases(tmp_path):
    two = write_phantom_dataset(tmp_path / "two", 2, seed=9, drop_rate=0.5, progress=False)
    three = write_phantom_dataset(tmp_path / "three", 3, seed=9, drop_rate=0.5, progress=False)
    assert three["cases"][:2] == two["cases"]
    for k in range(2):
        case = f"Phantom_{k:04d}"
        files = sorted(os.listdir(tmp_path / "two" / case))
        assert files == sorted(os.listdir(tmp_path / "three" / case))
        for name in files:
            a = _load(tmp_path / "two" / case / name)[1]
            b = _load(tmp_path / "three" / case / name)[1]
            assert np.array_equal(a, b), (case, name)
    assert len({c["seed"] for c in three["cases"]}) == 3


def test_drop_rate_one_keeps_one_sequence_and_the_seg(tmp_path):
    manifest = write_phantom_dataset(tmp_path, 6, seed=1, drop_rate=1.0, prefix="Inc", progress=False)
    kept = set()
    for entry in manifest["cases"]:
        case = entry["case_id"]
        files = sorted(os.listdir(tmp_path / case))
        assert f"{case}_seg.nii.gz" in files
        assert len(entry["present"]) == 1 and len(entry["dropped"]) == 3
        assert sorted(set(entry["present"]) | set(entry["dropped"])) == sorted(BRATS)
        assert files == sorted([f"{case}_seg.nii.gz", f"{case}_{entry['present'][0]}.nii.gz"])
        kept.add(entry["present"][0])
    assert len(kept) >= 2                                                   # the survivor is drawn, not fixed
    assert json.loads((tmp_path / "phantoms.json").read_text())["drop_rate"] == 1.0


def test_drop_law():
    draws = [phantom.drops(3, k, 0.3) for k in range(3000)]
    frequency = {m: np.mean([m in d for d in draws]) for m in BRATS}
    assert all(abs(f - 0.3) < 0.035 for f in frequency.values()), frequency
    assert all(len(d) < 4 for d in draws)                     # ~24 of 3000 would lose all four
    assert all(phantom.drops(3, k, 0.0) == [] for k in range(50))
    assert all(len(phantom.drops(3, k, 1.0)) == 3 for k in range(50))


def test_interrupted_write_leaves_no_half_case_and_resumes(tmp_path, monkeypatch):
    real_save = phantom.dataset.save_nifti

    def failing_save(array, affine, path, dtype):
        if "Phantom_0001_t1ce" in os.path.basename(path):
            raise RuntimeError("disk full")
        return real_save(array, affine, path, dtype)

    monkeypatch.setattr(phantom.dataset, "save_nifti", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom_dataset(tmp_path, 3, seed=2, progress=False)
    # no half case, no temporary folder
    assert sorted(os.listdir(tmp_path)) == [fileio.MARKER, "Phantom_0000", "phantoms.json"]
    assert [c["case_id"] for c in json.loads((tmp_path / "phantoms.json").read_text())["cases"]] == ["Phantom_0000"]
    first = tmp_path / "Phantom_0000" / "Phantom_0000_flair.nii.gz"
    stamp = first.stat().st_mtime_ns

    monkeypatch.setattr(phantom.dataset, "save_nifti", real_save)
    manifest = write_phantom_dataset(tmp_path, 3, seed=2, progress=False, skip_existing=True)
    assert first.stat().st_mtime_ns == stamp                                  # resumed, not rewritten
    assert sorted(os.listdir(tmp_path)) == [fileio.MARKER, "Phantom_0000", "Phantom_0001", "Phantom_0002",
                                            "phantoms.json"]
    assert len(os.listdir(tmp_path / "Phantom_0001")) == 5 and manifest["num_cases"] == 3


SMALL = (16, 16, 16)


def dead_partial(target):
    """A ``.NAME.partial-HOST-PID-*`` folder beside ``target`` as a killed run leaves it (its process is gone)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    path = fileio.partial_name(str(target)).replace(f"-{os.getpid()}-", f"-{proc.pid}-", 1)
    os.makedirs(path)
    with open(os.path.join(path, "half.nii.gz"), "wb") as f:
        f.write(b"half")
    return os.path.basename(path)


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "Phantom_0000").mkdir()
    (user / "Phantom_0000" / "notes.txt").write_text("mine")
    (user / "phantoms.json").write_text("{}")
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing") as info:
        write_phantom_dataset(user, 1, shape=SMALL, progress=False)
    assert "\n" not in str(info.value)
    assert (user / "Phantom_0000" / "notes.txt").read_text() == "mine"
    assert (user / "phantoms.json").read_text() == "{}" and (user / "thesis.tex").read_text() == "precious"
    assert sorted(os.listdir(user)) == ["Phantom_0000", "phantoms.json", "src", "thesis.tex"]
    (tmp_path / "afile").write_text("x")
    assert main(["prepare", "phantom", "--out", str(tmp_path / "afile"), "--cases", "1"]) == 2
    assert (tmp_path / "afile").read_text() == "x"
    assert main(["prepare", "phantom", "--out", str(tmp_path / "none"), "--cases", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a folder" in err[0] and "cases" in err[1]
    assert not (tmp_path / "none").exists()


def test_rewrites_its_own_and_legacy_data_sets_and_cleans_dead_partials(tmp_path):
    out = tmp_path / "nifti"
    write_phantom_dataset(out, 1, shape=SMALL, progress=False)
    litter = dead_partial(out / "Phantom_0000")
    write_phantom_dataset(out, 2, shape=SMALL, seed=1, progress=False)          # ours: rewritten, litter gone
    assert sorted(os.listdir(out)) == [fileio.MARKER, "Phantom_0000", "Phantom_0001", "phantoms.json"], litter
    os.remove(out / fileio.MARKER)                                             # as written before markers
    write_phantom_dataset(out, [1], shape=SMALL, progress=False, skip_existing=True)
    assert set(fileio.read_marker(str(out))["files"]) == set(fileio.list_files(str(out)))
    (out / "Phantom_0000" / "notes.txt").write_text("mine")                    # now it holds a user's file
    with pytest.raises(FileExistsError, match="notes.txt"):
        write_phantom_dataset(out, 1, shape=SMALL, progress=False)
    os.remove(out / fileio.MARKER)
    with pytest.raises(FileExistsError, match="refusing"):                     # nor is it a legacy data set
        write_phantom_dataset(out, 1, shape=SMALL, progress=False)
    assert (out / "Phantom_0000" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_brats_size_case():
    volumes, labels, affine = make_phantom_case(0, shape=(155, 240, 240), drop=("t1", "t2"))
    assert tuple(volumes) == ("flair", "t1ce") and volumes["flair"].shape == (155, 240, 240)
    np.testing.assert_allclose(np.diag(affine)[:3], 1.0)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}
    brain = volumes["flair"] > 0
    assert np.array_equal(brain, volumes["t1ce"] > 0) and not np.any(labels[~brain])
    assert not brain[0].any() and not brain[:, 0].any() and not brain[:, :, 0].any()   # inside the field of view
