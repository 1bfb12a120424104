"""``shaspec train`` -> ``evaluate`` -> ``predict`` on toy data, through the command line."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf.cli import main
from shaspec_tf.data.schema import BratsRecord, brats_example
from shaspec_tf.data.toy import toy_case

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("eval", 2)):
        os.makedirs(root / "data" / split)
        with tf.io.TFRecordWriter(str(root / "data" / split / "data-00000-of-00001.tfrecord")) as writer:
            for i in range(count):
                image, labels = toy_case(rng, (32, 36, 36))
                mask = np.ones(4, np.int64) if split == "eval" or i == 0 else np.array([1, 0, 1, 1])
                writer.write(brats_example(BratsRecord(f"{split}{i}", image * mask, mask, labels,
                                                       spacing=(2.0, 1.0, 1.0))).SerializeToString())
    for variant in ("shaspec", "baseline"):
        assert main(["train", "--task", "brats", "--data", str(root / "data"), "--out", str(root / variant),
                     "--preset", "tiny", "--variant", variant, "--steps", "2", "--checkpoint-every", "2",
                     "--batch-size", "1", "--crop", "32,32,32", "--eager"]) == 0
    return root


def test_evaluate_writes_every_subset_and_compares_models(trained, capsys):
    out = trained / "eval"
    args = ["evaluate", "--model", str(trained / "shaspec"), "--model", str(trained / "baseline"),
            "--data", str(trained / "data"), "--out", str(out), "--roi", "32,32,32"]
    assert main(args) == 0
    metrics = json.loads((out / "shaspec" / "metrics.json").read_text())
    assert len(metrics) == 16 and "flair+t1+t1ce+t2" in metrics and "mean" in metrics
    for region in ("ET", "WT", "TC"):
        assert 0.0 <= metrics["mean"][region]["dice"] <= 1.0
    for name in ("metrics.csv", "metrics.md", "heatmap.png"):
        assert (out / "shaspec" / name).stat().st_size > 0
    comparison = (out / "comparison.md").read_text()
    assert "shaspec" in comparison and "baseline" in comparison
    assert "mean over subsets" in capsys.readouterr().out


def test_predict_writes_brats_labels_on_the_input_grid(trained, tmp_path):
    rng = np.random.default_rng(5)
    image, _ = toy_case(rng, (40, 48, 44))
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    paths = {}
    for index, name in ((0, "flair"), (2, "t1ce")):
        volume = np.transpose(image[..., index] * 100 + 300 * (image[..., index] != 0), (2, 1, 0))
        paths[name] = tmp_path / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), paths[name])
    out = tmp_path / "pred" / "seg.nii.gz"
    assert main(["predict", "--model", str(trained / "shaspec"), "--flair", str(paths["flair"]),
                 "--t1ce", str(paths["t1ce"]), "--out", str(out), "--roi", "32,32,32"]) == 0
    seg = nib.load(str(out))
    assert seg.shape == (44, 48, 40) and np.allclose(seg.affine, affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 4}
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]  # no partial file left


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    assert main(["predict", "--model", str(trained / "shaspec"), "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "at least one of" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "nothing"), "--data", str(trained / "data"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model_config.json" in err[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_config.json").write_text((trained / "shaspec" / "model_config.json").read_text())
    (broken / "model.weights.h5").write_bytes(b"garbage")
    assert main(["evaluate", "--model", str(broken), "--data", str(trained / "data"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
