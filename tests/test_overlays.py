"""Segmentation overlays: the reference, full-set and worst-subset label maps over the MRI, one PNG per case, written
with the evaluation reports (shaspec_tf/overlays.py) and listed in metrics.md."""
import json
import os

import numpy as np
import pytest

from shaspec_tf.data.masks import all_subsets
from shaspec_tf.data.toy import toy_case
from shaspec_tf.evaluation import evaluate_subsets, write_report_folder, write_reports
from shaspec_tf.overlays import OVERLAY_KEY, axial_slices, overlay_rows
from shaspec_tf.taskspec.constants import AVMNIST_MODALITIES, BRATS_MODALITIES

SHAPE = (28, 40, 36)
WT_GREEN = np.array([0x31, 0xA3, 0x54]) / 255.0       # REGION_COLOURS[0]: WT, painted first


def _cases(count=3):
    rng = np.random.default_rng(3)
    cases = []
    for i in range(count):
        image, labels = toy_case(rng, SHAPE)
        cases.append({"case_id": f"phantom/{i}", "image": image, "labels": labels, "spacing": (2.0, 1.0, 1.0)})
    return cases


def _predict(case, mask):
    """Right with T1ce; with FLAIR and without T1ce, the whole tumour as oedema; otherwise nothing, so the worst
    subsets are the ones with neither (t1, t2, t1+t2: t1 and t2 come first in all_subsets order)."""
    labels = case["labels"]
    if mask[2]:
        return labels.copy()
    if mask[0]:
        return np.where(labels > 0, 2, 0).astype(np.uint8)
    return np.zeros_like(labels)


@pytest.fixture(scope="module")
def phantom_results():
    return evaluate_subsets(_predict, _cases(), BRATS_MODALITIES, overlay_cases=2, progress=False)


def test_the_kept_slices_are_the_evaluated_predictions_through_the_tumour(phantom_results):
    kept = phantom_results[OVERLAY_KEY]
    assert kept["modality"] == "flair" and [c["case_id"] for c in kept["cases"]] == ["phantom/0", "phantom/1"]
    names = [name for name, _ in all_subsets(BRATS_MODALITIES)]
    for case, source in zip(kept["cases"], _cases()):
        slices = case["slices"]
        tumour_depths = np.flatnonzero((source["labels"] > 0).any(axis=(1, 2)))
        centre = np.average(np.arange(SHAPE[0]), weights=(source["labels"] > 0).sum(axis=(1, 2)))
        assert len(slices) == 3 and all(tumour_depths[0] <= k <= tumour_depths[-1] for k in slices)
        assert min(abs(k - centre) for k in slices) <= 0.5
        assert list(case["predictions"]) == names                       # every subset: the worst are known later
        np.testing.assert_array_equal(case["reference"], source["labels"][slices])
        np.testing.assert_array_equal(case["image"], source["image"][slices, :, :, 0])
        for name, mask in all_subsets(BRATS_MODALITIES):
            np.testing.assert_array_equal(case["predictions"][name], _predict(source, mask)[slices])
    assert overlay_rows(phantom_results) == [("full set", "flair+t1+t1ce+t2"), ("worst subset 1", "t1"),
                                             ("worst subset 2", "t2")]


def test_axial_slices_centre_on_the_tumour_or_the_volume():
    labels = np.zeros((40, 8, 8), np.uint8)
    labels[10:19, 2:5, 2:5] = 2                                # centre 14, extent 9 -> a quarter is 2
    assert axial_slices(labels) == [12, 14, 16]
    assert axial_slices(np.zeros((40, 8, 8), np.uint8)) == [15, 20, 25]
    tiny = np.zeros((3, 4, 4), np.uint8)
    tiny[0, 1, 1] = 4
    assert axial_slices(tiny) == [0, 1]                        # clipped into the volume, no repeats


def test_slices_are_oriented_by_the_case_affine_when_it_has_one():
    from shaspec_tf.overlays import _display_affine

    plain = _display_affine({"spacing": [2.0, 1.0, 0.5]})                  # [D, H, W] spacing: i is W, j is H
    np.testing.assert_array_equal(plain, np.diag([0.5, 1.0, 1.0, 1.0]))
    lps = np.array([[-0.5, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 2.0, -70], [0, 0, 0, 1]])
    flipped = _display_affine({"spacing": [2.0, 1.0, 0.5], "affine": lps.tolist()})
    np.testing.assert_array_equal(flipped, np.diag([-0.5, -1.0, 1.0, 1.0]))  # mirrored as a viewer shows it
    sagittal = np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])  # i runs along z
    np.testing.assert_array_equal(_display_affine({"spacing": [1, 1, 1], "affine": sagittal}), np.eye(4))


def _image(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(path)


def test_overlays_are_written_and_listed_in_the_report(phantom_results, tmp_path):
    out = tmp_path / "eval"
    paths = write_report_folder({"ShaSpec": phantom_results}, str(out))["ShaSpec"]
    files = sorted(p.name for p in (out / "overlays").iterdir())
    assert files == ["phantom_0.png", "phantom_1.png"]
    assert paths["overlay:phantom/0"] == str(out / "overlays" / "phantom_0.png")

    image = _image(out / "overlays" / "phantom_0.png")
    assert image.shape[:2] == (1170, 820)                      # 4 rows (reference, full, 2 worst) x 3 slices
    rgb = image[..., :3]
    assert (rgb.max(axis=-1) > 0.2).mean() > 0.05              # the MRI is drawn, not a black page
    greenish = np.abs(rgb - (0.55 * WT_GREEN + 0.45 * rgb.mean(axis=-1, keepdims=True))).max(axis=-1) < 0.12
    half = rgb.shape[0] // 2
    assert greenish[:half].sum() > 1000                        # reference and full set: the tumour painted
    assert greenish[half:-80].sum() == 0                       # the worst subsets found nothing (legend excluded)
    assert greenish[-80:].sum() > 50                           # the legend's WT patch

    markdown = (out / "metrics.md").read_text()
    section = markdown.split("## Segmentation overlays", 1)[1]
    assert "[overlays/phantom_0.png](overlays/phantom_0.png)" in section and "![phantom/1](overlays/phantom_1.png)" \
        in section
    assert "full set (flair+t1+t1ce+t2)" in section and "worst subset 1 (t1)" in section
    per_case = json.loads((out / "metrics_per_case.json").read_text())
    assert OVERLAY_KEY not in per_case                          # the arrays stay out of the JSON reports
    marker = json.loads((out / ".shaspec-output.json").read_text())
    assert "overlays/phantom_0.png" in json.dumps(marker)       # part of our report folder, replaceable as a whole
    write_report_folder({"ShaSpec": phantom_results}, str(out))  # an earlier report of ours is replaced


def test_no_overlays_for_classification_or_when_turned_off(tmp_path):
    def classify(case, mask):
        return case["label"] if mask[0] else (case["label"] + 1) % 10

    cases = [{"case_id": "batch0", "label": np.arange(10)}]
    results = evaluate_subsets(classify, cases, AVMNIST_MODALITIES, task="avmnist", progress=False)
    assert OVERLAY_KEY not in results
    paths = write_reports(results, str(tmp_path / "avmnist"))
    assert not any(key.startswith("overlay") for key in paths)
    assert not (tmp_path / "avmnist" / "overlays").exists()
    assert "overlays" not in (tmp_path / "avmnist" / "metrics.md").read_text()

    off = evaluate_subsets(_predict, _cases(1), BRATS_MODALITIES, overlay_cases=0, progress=False)
    assert OVERLAY_KEY not in off
    no_image = evaluate_subsets(_predict, [{"case_id": "x", "labels": _cases(1)[0]["labels"]}], BRATS_MODALITIES,
                                progress=False)
    assert OVERLAY_KEY not in no_image                          # nothing to draw the labels on
    with pytest.raises(ValueError, match="overlay_cases"):
        evaluate_subsets(_predict, _cases(1), BRATS_MODALITIES, overlay_cases=-1, progress=False)


def test_without_nilearn_the_other_reports_are_written(phantom_results, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "nilearn.plotting", None)   # import nilearn.plotting -> ImportError
    paths = write_reports(phantom_results, str(tmp_path))
    assert "pip install 'shaspec-tf[pipeline]'" in capsys.readouterr().err
    assert not any(key.startswith("overlay") for key in paths) and not (tmp_path / "overlays").exists()
    assert (tmp_path / "heatmap.png").is_file() and "overlays" not in (tmp_path / "metrics.md").read_text()


@pytest.mark.tensorflow
def test_shaspec_evaluate_writes_overlays(brats_data, tmp_path, capsys):
    import shaspec_tf
    from shaspec_tf.cli import main
    from shaspec_tf.models.saving import save_model

    model_path = str(tmp_path / "tiny.keras")
    save_model(shaspec_tf.build_segmenter("tiny"), model_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", model_path, "--data", brats_data, "--split", "train", "--out", str(out),
                 "--roi", "32,32,32"]) == 0
    # only c0 of the fixture has every modality, so it is the one case evaluated and pictured
    assert sorted(os.listdir(out / "overlays")) == ["c0.png"]
    assert _image(out / "overlays" / "c0.png").shape[:2] == (1170, 820)
    assert "overlays/c0.png" in (out / "metrics.md").read_text()
    printed = capsys.readouterr().out
    assert "segmentation overlays" in printed and str(out / "overlays") in printed


@pytest.mark.cloud
@pytest.mark.tensorflow
def test_overlays_go_to_a_bucket(gcs):
    from conftest import run_with_gcs

    bucket = gcs.create_bucket("overlays")
    out = run_with_gcs(gcs, f"""
        import json
        import numpy as np
        from shaspec_tf import fileio
        from shaspec_tf.data.toy import toy_case
        from shaspec_tf.evaluation import evaluate_subsets, write_report_folder
        from shaspec_tf.taskspec.constants import BRATS_MODALITIES

        image, labels = toy_case(np.random.default_rng(0), (24, 32, 32))
        cases = [{{"case_id": "b0", "image": image, "labels": labels}}]
        results = evaluate_subsets(lambda case, mask: case["labels"], cases, BRATS_MODALITIES, progress=False)
        paths = write_report_folder({{"m": results}}, "{bucket}/eval")["m"]
        png = fileio.read_bytes(paths["overlay:b0"])
        print(json.dumps({{"path": paths["overlay:b0"], "magic": png[:4].hex(), "size": len(png),
                           "listed": fileio.listdir("{bucket}/eval/overlays"),
                           "markdown": "overlays/b0.png" in fileio.read_text("{bucket}/eval/metrics.md")}}))
    """)
    assert out["path"] == f"{bucket}/eval/overlays/b0.png" and out["magic"] == "89504e47" and out["size"] > 10_000
    assert out["listed"] == ["b0.png"] and out["markdown"]
