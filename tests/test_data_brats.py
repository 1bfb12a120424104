"""BraTS NIfTI reading and preprocessing (``shaspec_tf.data.brats``).

Cases are written here with nibabel in the BraTS 2018-2021 and 2023 layouts, as small (24 x 20 x 16 voxel)
volumes. Expected arrays come from the written data (``data.transpose(2, 1, 0)``) or from a NumPy re-implementation
of the official ``truncate`` written independently below (``reference_truncate``: explicit bin edges + bincount).
"""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shaspec_tf.data import brats, schema
from shaspec_tf.data.brats import BratsPreprocessError

IJK = (24, 20, 16)            # NIfTI voxel shape (i, j, k); arrays are (k, j, i) = (16, 20, 24)
# BraTS-like LPS affine with voxel sizes 1 x 1.5 x 2 mm along i, j, k (nibabel derives the header zooms from it)
LPS = np.array([[-1.0, 0, 0, 23.0], [0, -1.5, 0, 28.5], [0, 0, 2.0, 0], [0, 0, 0, 1]])
SUFFIX = {"2018": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
          "2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"}}


# -- helpers ------------------------------------------------------------------------------------------------------
def phantom(seed, shape=IJK):
    """``{modality: float32 (i, j, k)}`` and uint8 labels: an ellipsoidal brain away from the borders (zero
    background), integer intensities concentrated enough for the 50-voxel histogram rule, a few bright outliers, and
    a spherical tumour with labels 1, 2, 4."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    centre = np.array([11.0, 9.5, 7.0])
    brain = np.sum(((grid - centre) / np.array([8.0, 6.5, 5.0])) ** 2, -1) < 1.0
    volumes = {}
    for m, name in enumerate(schema.BRATS_MODALITIES):
        v = np.zeros(shape, np.float32)
        v[brain] = np.round(rng.normal(100.0 * (m + 1), 4.0, brain.sum()))
        outliers = np.argwhere(brain)[rng.choice(brain.sum(), 5, replace=False)]
        v[tuple(outliers.T)] = 2000.0 + m
        volumes[name] = v
    dist = np.sqrt(np.sum((grid - centre - [2.0, 1.0, 0.0]) ** 2, -1))
    labels = np.zeros(shape, np.uint8)
    labels[(dist < 4.0) & brain] = 2
    labels[(dist < 2.5) & brain] = 4
    labels[(dist < 1.5) & brain] = 1
    return volumes, labels


def save(path, data, affine=LPS, dtype=None, slope_inter=None):
    image = nib.Nifti1Image(np.asarray(data) if dtype is None else np.asarray(data).astype(dtype), affine)
    if slope_inter is not None:
        image.header.set_slope_inter(*slope_inter)
    nib.save(image, str(path))
    return Path(path)


def write_case(root, case_id, layout="2018", seed=0, missing=(), seg=True, ext=".nii.gz", sub="", labels=None):
    """Write one case; returns ``(folder, volumes (i, j, k), labels (i, j, k))``."""
    volumes, default_labels = phantom(seed)
    labels = default_labels if labels is None else labels
    folder = Path(root) / sub / case_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, v in volumes.items():
        if name not in missing:
            save(folder / f"{case_id}{SUFFIX[layout][name]}{ext}", v)
    if seg:
        stored = labels.copy()
        if layout == "2023":
            stored[stored == 4] = 3
        save(folder / f"{case_id}{SUFFIX[layout]['seg']}{ext}", stored, dtype=np.uint8)
    return folder, volumes, labels


def only_case(root):
    (files,) = brats.discover_cases(root)
    return files


def reference_truncate(x):
    """Official ``truncate``, re-implemented: ``int(max)`` bins over [min, max], clip at the index of the last bin
    with >= 50 voxels, corner value = background, z-score of the rest."""
    x = np.array(x, np.float64)
    bins = int(x.max())
    edges = np.linspace(x.min(), x.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, x.ravel(), side="right") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    level = float([i for i in range(bins) if counts[i] >= 50][-1])
    x[x >= level] = level
    brain = x != x[0, 0, 0]
    mean, std = x[brain].mean(), x[brain].std()
    return np.where(brain, (x - mean) / std, 0.0), level


def expect_error(match_path, fn, *args, **kwargs):
    with pytest.raises(BratsPreprocessError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(match_path) in message, message
    return message


# -- discovery ----------------------------------------------------------------------------------------------------
def test_discover_2018_layout_subfolders_extensions_and_missing_t1(tmp_path):
    write_case(tmp_path, "Brats18_CBICA_B", sub="LGG", ext=".nii", seed=1)
    write_case(tmp_path, "Brats18_2013_A", sub="HGG", missing=("t1",), seed=2)
    write_case(tmp_path, "Brats18_TCIA_C", sub="HGG", seg=False, seed=3)
    (tmp_path / "HGG" / "notes").mkdir()
    (tmp_path / "HGG" / "notes" / "readme.txt").write_text("x")
    (tmp_path / "HGG" / "notes" / "._Brats18_X_flair.nii.gz").write_bytes(b"")     # macOS resource fork
    save(tmp_path / "only_seg_seg.nii.gz", np.zeros(IJK, np.uint8))                  # labels only: not a case

    cases = brats.discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["Brats18_2013_A", "Brats18_CBICA_B", "Brats18_TCIA_C"]
    a, b, c = cases
    assert all(case.layout == "2018" for case in cases)
    assert a.paths["t1"] is None and a.modality_mask.tolist() == [1, 0, 1, 1]
    assert a.paths["t1ce"] == str(tmp_path / "HGG" / "Brats18_2013_A" / "Brats18_2013_A_t1ce.nii.gz")
    assert a.paths["t1ce"] != a.paths["t1"] and a.folder == str(tmp_path / "HGG" / "Brats18_2013_A")
    assert b.paths["flair"].endswith("/Brats18_CBICA_B_flair.nii") and b.seg.endswith("/Brats18_CBICA_B_seg.nii")
    assert b.modality_mask.tolist() == [1, 1, 1, 1]
    assert c.seg is None

    record = brats.load_case(a)
    assert record.modality_mask.tolist() == [1, 0, 1, 1]
    assert not record.image[..., 1].any()
    assert record.image[..., 0].any() and record.image[..., 2].any()


def test_discover_2023_layout(tmp_path):
    folder, volumes, labels = write_case(tmp_path, "BraTS-GLI-00002-000", layout="2023", missing=("t2",))
    write_case(tmp_path, "BraTS-GLI-00000-000", layout="2023", seed=5)
    cases = brats.discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    files = cases[1]
    assert files.layout == "2023"
    assert files.paths["flair"].endswith("-t2f.nii.gz") and files.paths["t1"].endswith("-t1n.nii.gz")
    assert files.paths["t1ce"].endswith("-t1c.nii.gz") and files.paths["t2"] is None
    assert files.seg == str(folder / "BraTS-GLI-00002-000-seg.nii.gz")
    record = brats.load_case(files)
    for channel, name in enumerate(schema.BRATS_MODALITIES[:3]):
        np.testing.assert_array_equal(record.image[..., channel], volumes[name].transpose(2, 1, 0))


def test_discover_bad_folders(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        brats.discover_cases(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(empty, brats.discover_cases, empty)
    (empty / "sub").mkdir()
    (empty / "sub" / "scan.nii.gz").write_bytes(b"x")
    expect_error(empty, brats.discover_cases, empty)


def test_discover_duplicates(tmp_path):
    folder, volumes, _ = write_case(tmp_path / "a", "Brats_X")
    save(folder / "Brats_X_flair.nii", volumes["flair"])
    message = expect_error(folder / "Brats_X_flair", brats.discover_cases, tmp_path / "a")
    assert "flair" in message
    write_case(tmp_path / "b", "Brats_Y", sub="HGG")
    write_case(tmp_path / "b", "Brats_Y", sub="LGG")
    expect_error("Brats_Y", brats.discover_cases, tmp_path / "b")


# -- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.tensorflow
def test_round_trip_nifti_to_tfrecord_is_exact(tmp_path):
    _, volumes, labels = write_case(tmp_path, "Brats20_Training_007", missing=("t2",), seed=7)
    record = brats.preprocess(brats.load_case(only_case(tmp_path), require_label=True), crop_to_brain=False,
                              normalize=False)
    assert nib.load(str(only_case(tmp_path).paths["flair"])).header.get_zooms() == (1.0, 1.5, 2.0)
    expected = np.stack([volumes[m].transpose(2, 1, 0) if m != "t2" else np.zeros(IJK[::-1], np.float32)
                         for m in schema.BRATS_MODALITIES], -1)
    np.testing.assert_array_equal(record.image, expected)
    np.testing.assert_array_equal(record.label, labels.transpose(2, 1, 0))
    assert record.image.dtype == np.float32 and record.label.dtype == np.uint8
    assert record.modality_mask.tolist() == [1, 1, 1, 0]
    assert tuple(record.spacing) == (2.0, 1.5, 1.0)
    np.testing.assert_array_equal(record.affine, LPS)
    assert tuple(record.original_shape) == IJK[::-1] and tuple(record.crop_start) == (0, 0, 0)

    back = schema.brats_record_from_example(schema.brats_example(record).SerializeToString())
    np.testing.assert_array_equal(back.image, expected)
    np.testing.assert_array_equal(back.label, labels.transpose(2, 1, 0))
    np.testing.assert_array_equal(back.modality_mask, record.modality_mask)
    assert back.case_id == "Brats20_Training_007" and tuple(back.spacing) == (2.0, 1.5, 1.0)
    np.testing.assert_array_equal(back.affine, LPS)


@pytest.mark.tensorflow
def test_round_trip_normalised_and_cropped(tmp_path):
    _, volumes, labels = write_case(tmp_path, "case", seed=11)
    record = brats.preprocess(brats.load_case(only_case(tmp_path), require_label=True))
    # the brain box, from the phantom's own (i, j, k) foreground
    foreground = np.any([v != 0 for v in volumes.values()], axis=0) | (labels > 0)
    nz = np.argwhere(foreground.transpose(2, 1, 0))
    start, stop = nz.min(0), nz.max(0) + 1
    assert tuple(record.crop_start) == tuple(start) and tuple(record.original_shape) == IJK[::-1]
    assert record.image.shape == tuple(stop - start) + (4,)
    assert record.image.shape[:3] != IJK[::-1]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    for channel, name in enumerate(schema.BRATS_MODALITIES):
        expected, level = reference_truncate(volumes[name].transpose(2, 1, 0))
        assert level < 2000                     # the outliers were clipped
        np.testing.assert_allclose(record.image[..., channel], expected[box], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(record.image[..., channel] == 0, expected[box] == 0)
    np.testing.assert_array_equal(record.label, labels.transpose(2, 1, 0)[box])

    back = schema.brats_record_from_example(schema.brats_example(record).SerializeToString())
    np.testing.assert_array_equal(back.image, record.image)
    np.testing.assert_array_equal(back.label, record.label)
    assert tuple(back.crop_start) == tuple(start) and tuple(back.original_shape) == IJK[::-1]
    np.testing.assert_array_equal(brats.uncrop(back.label, back.original_shape, back.crop_start),
                                  labels.transpose(2, 1, 0))


def test_int16_with_scaling_is_scaled(tmp_path):
    folder, volumes, _ = write_case(tmp_path, "case", missing=("flair",))
    raw = np.random.default_rng(3).integers(0, 500, IJK).astype(np.int16)
    path = save(folder / "case_flair.nii.gz", raw, dtype=np.int16, slope_inter=(2.0, 10.0))
    stored = nib.load(str(path))
    assert stored.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(stored.dataobj.get_unscaled()), raw)   # the file holds raw ints
    record = brats.load_case(only_case(tmp_path))
    np.testing.assert_array_equal(record.image[..., 0], (raw.astype(np.float32) * 2 + 10).transpose(2, 1, 0))


def test_uncompressed_nii(tmp_path):
    _, volumes, labels = write_case(tmp_path, "case", ext=".nii", seed=4)
    files = only_case(tmp_path)
    assert files.paths["t2"].endswith("_t2.nii")
    record = brats.load_case(files, require_label=True)
    np.testing.assert_array_equal(record.image[..., 3], volumes["t2"].transpose(2, 1, 0))
    np.testing.assert_array_equal(record.label, labels.transpose(2, 1, 0))


@pytest.mark.parametrize("transform", [[[0, -1], [1, 1], [2, 1]],      # flip i: LPS -> RPS
                                       [[0, -1], [1, -1], [2, 1]],     # flip i and j: LPS -> RAS
                                       [[1, 1], [0, -1], [2, -1]]])    # swap i/j and flip: another axis order
def test_other_orientation_loads_to_the_same_arrays(tmp_path, transform):
    folder, volumes, labels = write_case(tmp_path, "case", seed=9)
    ornt = np.array(transform, dtype=float)
    for name, suffix in (("t1", "_t1"), ("seg", "_seg")):
        path = folder / f"case{suffix}.nii.gz"
        moved = nib.load(str(path)).as_reoriented(ornt)
        assert nib.aff2axcodes(moved.affine) != nib.aff2axcodes(LPS)
        if transform[0][0] == 1:
            assert moved.shape != IJK
        nib.save(moved, str(path))
    assert np.asarray(nib.load(str(folder / "case_t1.nii.gz")).dataobj).tolist() != volumes["t1"].tolist()
    record = brats.load_case(only_case(tmp_path), require_label=True)
    for channel, name in enumerate(schema.BRATS_MODALITIES):
        np.testing.assert_array_equal(record.image[..., channel], volumes[name].transpose(2, 1, 0))
    np.testing.assert_array_equal(record.label, labels.transpose(2, 1, 0))
    np.testing.assert_array_equal(record.affine, LPS)
    assert tuple(record.spacing) == (2.0, 1.5, 1.0)


def test_canonical_orientation_of_a_permuted_reference(tmp_path):
    folder, volumes, _ = write_case(tmp_path, "case", seed=12, missing=("t1", "t1ce", "t2"))
    path = folder / "case_flair.nii.gz"
    nib.save(nib.load(str(path)).as_reoriented(np.array([[1, 1], [0, -1], [2, 1]], float)), str(path))
    stored = nib.load(str(path))
    assert stored.header.get_zooms()[:3] == (1.5, 1.0, 2.0)
    canonical = nib.as_closest_canonical(stored)
    record = brats.load_case(only_case(tmp_path), orientation="canonical")
    assert tuple(record.spacing) == tuple(float(z) for z in canonical.header.get_zooms()[:3][::-1]) == (2.0, 1.5, 1.0)
    np.testing.assert_allclose(record.affine, canonical.affine)
    np.testing.assert_array_equal(record.image[..., 0], canonical.get_fdata(dtype=np.float32).transpose(2, 1, 0))
    reference = brats.load_case(only_case(tmp_path))
    assert tuple(reference.spacing) == (2.0, 1.0, 1.5)     # the stored (permuted) grid, zooms reversed


def test_canonical_orientation_matches_as_closest_canonical(tmp_path):
    folder, volumes, labels = write_case(tmp_path, "case", seed=10)
    path = folder / "case_t2.nii.gz"
    nib.save(nib.load(str(path)).as_reoriented(np.array([[0, -1], [1, 1], [2, 1]], float)), str(path))
    record = brats.load_case(only_case(tmp_path), orientation="canonical")
    canonical = nib.as_closest_canonical(nib.load(str(folder / "case_flair.nii.gz")))
    assert nib.aff2axcodes(record.affine) == ("R", "A", "S")
    np.testing.assert_allclose(record.affine, canonical.affine)
    np.testing.assert_array_equal(record.image[..., 0], canonical.get_fdata(dtype=np.float32).transpose(2, 1, 0))
    np.testing.assert_array_equal(record.image[..., 3], volumes["t2"][::-1, ::-1].transpose(2, 1, 0))
    np.testing.assert_array_equal(record.label, labels[::-1, ::-1].transpose(2, 1, 0))


# -- bad inputs ---------------------------------------------------------------------------------------------------
def test_truncated_gzip(tmp_path):
    folder, _, _ = write_case(tmp_path, "case")
    path = folder / "case_t1ce.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with gzip.open(path) as handle:        # the header still reads: the failure is in the voxel data
        assert len(handle.read(348)) == 348
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert "truncated" in message


@pytest.mark.parametrize("shape", [IJK + (2,), IJK[:2]])
def test_not_3d(tmp_path, shape):
    folder, _, _ = write_case(tmp_path, "case")
    path = save(folder / "case_t2.nii.gz", np.ones(shape, np.float32))
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert "3D" in message and str(shape) in message


def test_trailing_singleton_axis_is_accepted(tmp_path):
    folder, volumes, _ = write_case(tmp_path, "case")
    save(folder / "case_t2.nii.gz", volumes["t2"][..., None])
    record = brats.load_case(only_case(tmp_path))
    np.testing.assert_array_equal(record.image[..., 3], volumes["t2"].transpose(2, 1, 0))


def test_shape_mismatch(tmp_path):
    folder, volumes, _ = write_case(tmp_path, "case")
    path = save(folder / "case_t1.nii.gz", volumes["t1"][:, :, :-1])
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert str(folder / "case_flair.nii.gz") in message


def test_affine_mismatch_names_both_files(tmp_path):
    folder, volumes, _ = write_case(tmp_path, "case")
    shifted = LPS.copy()
    shifted[2, 3] += 0.5
    path = save(folder / "case_t1ce.nii.gz", volumes["t1ce"], affine=shifted)
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert "affine" in message and str(folder / "case_flair.nii.gz") in message
    nearly = LPS.copy()
    nearly[2, 3] += 1e-4                    # within atol 1e-3: accepted
    save(folder / "case_t1ce.nii.gz", volumes["t1ce"], affine=nearly)
    assert brats.load_case(only_case(tmp_path)).modality_mask.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, bad):
    folder, volumes, _ = write_case(tmp_path, "case")
    v = volumes["flair"].copy()
    v[3, 4, 5] = bad
    path = save(folder / "case_flair.nii.gz", v)
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert "NaN" in message


@pytest.mark.parametrize("value", [3, 5, 255])
def test_labels_outside_the_set(tmp_path, value):
    _, labels = phantom(0)
    labels = labels.copy()
    labels[0, 0, :2] = value
    folder, _, _ = write_case(tmp_path, "case", labels=labels)
    message = expect_error(folder / "case_seg.nii.gz", brats.load_case, only_case(tmp_path))
    assert f"[{value}]" in message


def test_fractional_label_rejected(tmp_path):
    folder, _, labels = write_case(tmp_path, "case")
    bad = labels.astype(np.float32)
    bad[1, 1, 1] = 1.5
    path = save(folder / "case_seg.nii.gz", bad)
    message = expect_error(path, brats.load_case, only_case(tmp_path))
    assert "1.5" in message


def test_2023_label_3_is_enhancing(tmp_path):
    folder, _, labels = write_case(tmp_path, "BraTS-GLI-00001-000", layout="2023")
    stored = np.asarray(nib.load(str(folder / "BraTS-GLI-00001-000-seg.nii.gz")).dataobj)
    assert 3 in stored and 4 not in stored
    record = brats.load_case(only_case(tmp_path), require_label=True)
    assert 4 in record.label and 3 not in record.label
    np.testing.assert_array_equal(record.label, labels.transpose(2, 1, 0))
    # a 4 in a 2023 file is not a 2023 label
    wrong = stored.copy()
    wrong[wrong == 3] = 4
    path = save(folder / "BraTS-GLI-00001-000-seg.nii.gz", wrong, dtype=np.uint8)
    assert "[4]" in expect_error(path, brats.load_case, only_case(tmp_path))


@pytest.mark.parametrize("ext,limit,expect", [(".nii", None, "file holds"),
                                              (".nii.gz", None, "above the limit"),
                                              (".nii.gz", 4_000_000_000, "stream holds")])
def test_header_claiming_a_huge_volume_is_refused_before_reading(tmp_path, monkeypatch, ext, limit, expect):
    """A ~100-byte file whose header declares 1200^3 voxels: one line naming the file and the declared shape, and no
    gigabyte allocated on the way (it was 3.4 GB and 'truncated or corrupt file? (MemoryError: )')."""
    import tracemalloc

    folder, _, _ = write_case(tmp_path, "case", seg=False, missing=("t1", "t1ce", "t2"))
    header = nib.Nifti1Header()
    header.set_data_shape((1200, 1200, 1200))
    header.set_data_dtype(np.int16)
    blob = header.binaryblock + b"\0" * 4 + b"\1\0" * 8
    path = folder / f"case_flair{ext}"
    (folder / "case_flair.nii.gz").unlink()
    if ext == ".nii":
        path.write_bytes(blob)
    else:
        with gzip.open(path, "wb") as handle:
            handle.write(blob)
    if limit is not None:
        monkeypatch.setenv(brats.MAX_VOXELS_ENV, str(limit))
    tracemalloc.start()
    try:
        message = expect_error(path, brats.load_case, only_case(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "(1200, 1200, 1200)" in message and expect in message, message
    assert peak < 64 << 20, peak


def test_voxel_limit_argument_and_environment(tmp_path, monkeypatch):
    folder, _, _ = write_case(tmp_path, "case")
    voxels = int(np.prod(IJK))
    assert brats.load_case(only_case(tmp_path), max_voxels=voxels).image.shape[:3] == IJK[::-1]
    message = expect_error(folder / "case_flair.nii.gz", brats.load_case, only_case(tmp_path), max_voxels=voxels - 1)
    assert str(IJK) in message and f"{voxels - 1:,}" in message and brats.MAX_VOXELS_ENV in message
    monkeypatch.setenv(brats.MAX_VOXELS_ENV, str(voxels - 1))
    expect_error(folder / "case_flair.nii.gz", brats.load_case, only_case(tmp_path))
    assert brats.load_case(only_case(tmp_path), max_voxels=voxels).label.shape == IJK[::-1]   # the argument wins
    monkeypatch.setenv(brats.MAX_VOXELS_ENV, "lots")
    with pytest.raises(ValueError, match=brats.MAX_VOXELS_ENV):
        brats.load_case(only_case(tmp_path))
    monkeypatch.delenv(brats.MAX_VOXELS_ENV)
    assert brats.max_voxels_limit() == brats.MAX_VOXELS == 512 ** 3
    for bad in (0, -5, 2.5, "x"):
        with pytest.raises(ValueError, match="max_voxels"):
            brats.max_voxels_limit(bad)


def test_require_label_without_seg_names_the_case(tmp_path):
    write_case(tmp_path, "Brats18_NoSeg", seg=False)
    files = only_case(tmp_path)
    assert brats.load_case(files).label is None
    expect_error("Brats18_NoSeg", brats.load_case, files, require_label=True)


# -- normalisation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,negative,background", [(0, False, 0.0), (1, False, 30.0), (2, True, 0.0)])
def test_normalize_modality_matches_reference(seed, negative, background):
    rng = np.random.default_rng(seed)
    v = np.full((16, 20, 24), background, np.float32)              # background = the corner value, not always 0
    inside = (slice(2, 14), slice(3, 18), slice(2, 21))
    v[inside] = np.round(rng.normal(rng.uniform(200, 800), rng.uniform(3, 8), v[inside].shape))
    v[inside][rng.random(v[inside].shape) < 0.002] = 5000.0       # bright outliers, clipped away
    if negative:                                                   # min < 0: bin index != intensity (official)
        v[inside][rng.random(v[inside].shape) < 0.01] = -150.0
    expected, level = reference_truncate(v)
    assert level < v.max()
    before = v.copy()
    out = brats.normalize_modality(v)
    np.testing.assert_array_equal(v, before)                        # the input is not modified
    assert out.dtype == np.float32 and out.shape == v.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out == 0, expected == 0)
    assert not out[:2].any()                                         # background stays 0
    brain = out[inside]
    assert abs(float(brain.mean())) < 1e-4 and abs(float(brain.std()) - 1) < 1e-4


def test_normalize_modality_guards():
    rng = np.random.default_rng(0)
    small = np.zeros((8, 8, 8))
    small[2:6, 2:6, 2:6] = rng.uniform(0.1, 0.9, (4, 4, 4))     # max < 1: int(max) = 0 bins officially
    out = brats.normalize_modality(small)
    brain = small != 0
    np.testing.assert_allclose(out[brain], (small[brain] - small[brain].mean()) / small[brain].std(), rtol=1e-5)
    assert not out[~brain].any()

    huge = np.zeros((16, 20, 24))
    huge[2:14, 2:18, 2:22] = rng.normal(5e8, 5e4, (12, 16, 20))   # float data: 5e8 bins officially
    huge[5, 5, 5] = 1e9                                            # an outlier, to be clipped
    out = brats.normalize_modality(huge)
    edges = np.linspace(0.0, 1e9, brats.HISTOGRAM_MAX_BINS + 1)   # capped bins; level = the bin's lower edge
    which = np.clip(np.searchsorted(edges, huge.ravel(), side="right") - 1, 0, brats.HISTOGRAM_MAX_BINS - 1)
    level = edges[np.flatnonzero(np.bincount(which, minlength=brats.HISTOGRAM_MAX_BINS) >= 50)[-1]]
    assert 5e8 - 2e5 < level < 5e8 + 2e5
    clipped = np.minimum(huge, level)
    brain = clipped != 0
    expected = np.where(brain, (clipped - clipped[brain].mean()) / clipped[brain].std(), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out[5, 5, 5] == out[2:14, 2:18, 2:22].max()

    sparse = np.zeros((3, 3, 3))                                  # 19 background voxels
    sparse[1:3, 1:3, 1:3] = (np.arange(8) * 10.0 + 5).reshape(2, 2, 2)   # no bin holds 50 voxels
    out = brats.normalize_modality(sparse)
    brain = sparse != 0
    np.testing.assert_allclose(out[brain], (sparse[brain] - sparse[brain].mean()) / sparse[brain].std(), rtol=1e-5)

    assert not brats.normalize_modality(np.zeros((5, 5, 5))).any()
    constant = np.zeros((5, 5, 5))
    constant[1:4, 1:4, 1:4] = 7.0
    assert np.all(np.isfinite(brats.normalize_modality(constant)))


# -- cropping -----------------------------------------------------------------------------------------------------
def test_crop_uncrop_round_trip():
    rng = np.random.default_rng(4)
    shape = (16, 20, 24)
    image = np.zeros(shape + (4,), np.float32)
    image[3:11, 5:15, 4:19, 0] = rng.uniform(1, 10, (8, 10, 15))
    image[2:9, 6:12, 4:20, 2] = rng.uniform(1, 10, (7, 6, 16))
    image[0:16, 0:20, 0:24, 1] = rng.uniform(1, 10, shape)     # absent channel: must not widen the box
    label = np.zeros(shape, np.uint8)
    label[4:7, 7:10, 8:12] = 2
    label[5, 8, 9] = 4
    record = schema.BratsRecord("crop", image.copy(), np.array([1, 0, 1, 0]), label=label)
    cropped = brats.preprocess(record, normalize=False)
    assert tuple(cropped.crop_start) == (2, 5, 4) and cropped.image.shape[:3] == (9, 10, 16)
    assert tuple(cropped.original_shape) == shape
    np.testing.assert_array_equal(brats.uncrop(cropped.label, cropped.original_shape, cropped.crop_start), label)
    present = [0, 2]
    np.testing.assert_array_equal(brats.uncrop(cropped.image, cropped.original_shape, cropped.crop_start)[..., present],
                                  record.image[..., present])
    # a second crop composes with the first
    again = brats.crop_record(cropped, (1, 1, 1), (5, 6, 7))
    assert tuple(again.crop_start) == (3, 6, 5) and tuple(again.original_shape) == shape
    np.testing.assert_array_equal(brats.uncrop(again.label, again.original_shape, again.crop_start)[3:7, 6:11, 5:11],
                                  label[3:7, 6:11, 5:11])
    with pytest.raises(ValueError):
        brats.uncrop(cropped.label, (8, 8, 8), cropped.crop_start)


def test_crop_keeps_labels_outside_the_non_zero_voxels():
    image = np.zeros((10, 10, 10, 4), np.float32)
    image[4:6, 4:6, 4:6, 0] = 1.0
    label = np.zeros((10, 10, 10), np.uint8)
    label[8, 8, 8] = 2
    cropped = brats.preprocess(schema.BratsRecord("c", image, np.array([1, 0, 0, 0]), label=label), normalize=False)
    assert tuple(cropped.crop_start) == (4, 4, 4) and cropped.label.shape == (5, 5, 5)
    assert cropped.label[-1, -1, -1] == 2


def test_crop_of_empty_case_names_it():
    record = schema.BratsRecord("Empty_Case", np.zeros((6, 6, 6, 4), np.float32), np.array([1, 1, 0, 0]))
    expect_error("Empty_Case", brats.preprocess, record)
