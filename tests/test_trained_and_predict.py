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


def test_train_takes_model_options_and_refuses_unknown_ones_before_writing(trained, tmp_path, capsys):
    base = ["train", "--task", "brats", "--data", str(trained / "data"), "--preset", "tiny", "--steps", "1",
            "--checkpoint-every", "1", "--batch-size", "1", "--crop", "32,32,32", "--eager"]
    out = tmp_path / "opts"
    assert main(base + ["--out", str(out), "--model-option", "absent_features=zeros",
                        "--model-option", "fusion_kernel=1", "--model-option", "aspp_rates=[1, 2, 3]"]) == 0
    config = json.loads((out / "model_config.json").read_text())
    assert (config["absent_features"], config["fusion_kernel"], config["aspp_rates"]) == ("zeros", 1, [1, 2, 3])
    capsys.readouterr()
    for option, message in (("absent=zeros", "unknown option(s) ['absent']"), ("remat", "takes KEY=VALUE"),
                            ("absent_features=nan", "unknown absent_features 'nan'")):
        bad = tmp_path / "bad"
        assert main(base + ["--out", str(bad), "--model-option", option]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not bad.exists()


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
    # --out is one report folder of ours, marked, with nothing left beside it.
    assert json.loads((out / ".shaspec-output.json").read_text())["kind"] == "evaluation-report"
    assert sorted(p.name for p in out.iterdir()) == [".shaspec-output.json", "baseline", "comparison.csv",
                                                     "comparison.md", "comparison.png", "shaspec"]
    assert not [p.name for p in trained.iterdir() if p.name.startswith(".")]


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


def test_precision_reaches_the_sliding_window_of_predict_and_evaluate(trained, tmp_path, capsys):
    paths = _nifti_inputs(tmp_path)
    args = ["predict", "--model", str(trained / "shaspec"), "--flair", str(paths["flair"]), "--t1ce",
            str(paths["t1ce"]), "--roi", "32,32,32"]
    labels = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.nii.gz"
        assert main(args + ["--out", str(out), "--precision", precision]) == 0
        labels[precision] = np.asanyarray(nib.load(str(out)).dataobj)
    assert np.mean(labels["fp32"] == labels["bf16"]) > 0.98
    capsys.readouterr()
    # an unknown precision is one line from the window itself, before anything is written, in both commands
    assert main(args + ["--out", str(tmp_path / "fp16.nii.gz"), "--precision", "fp16"]) == 2
    assert main(["evaluate", "--model", str(trained / "shaspec"), "--data", str(trained / "data"), "--out",
                 str(tmp_path / "report"), "--roi", "32,32,32", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("precision must be one of fp32, bf16, got 'fp16'" in line for line in err), err
    assert not (tmp_path / "fp16.nii.gz").exists() and not (tmp_path / "report").exists()
    assert main(["predict", "--server", "localhost:1", "--model-name", "m", "--flair", str(paths["flair"]),
                 "--out", str(tmp_path / "x.nii.gz"), "--precision", "bf16"]) == 2
    assert "fixed in the exported graph" in capsys.readouterr().err


def test_predict_replaces_only_its_own_label_maps(trained, tmp_path, capsys):
    paths = _nifti_inputs(tmp_path)
    args = ["predict", "--model", str(trained / "shaspec"), "--flair", str(paths["flair"]), "--roi", "32,32,32"]
    out = tmp_path / "seg.nii.gz"
    assert main(args + ["--out", str(out)]) == 0
    assert main(args + ["--out", str(out)]) == 0  # a label map of ours: a re-run replaces it
    capsys.readouterr()
    user = tmp_path / "mine.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), user)  # the user's own segmentation
    original = user.read_bytes()
    assert main(args + ["--out", str(user)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a shaspec label map" in err[0] and "--overwrite" in err[0], err
    assert user.read_bytes() == original
    assert main(args + ["--out", str(user), "--overwrite"]) == 0
    assert nib.load(str(user)).shape == nib.load(str(paths["flair"])).shape


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


def _nifti_inputs(folder, names=("flair", "t1ce"), shape=(40, 48, 44)):
    image, _ = toy_case(np.random.default_rng(5), shape)
    paths = {}
    for index, name in enumerate(names):
        volume = np.transpose(image[..., index] * 100 + 300 * (image[..., index] != 0), (2, 1, 0))
        paths[name] = folder / f"case_{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), paths[name])
    return paths


def test_predict_refuses_an_output_that_is_an_input_before_any_work(tmp_path, capsys):
    from shaspec_serving.client import predict_nifti_remote

    paths = _nifti_inputs(tmp_path)
    flair = paths["flair"]
    original = flair.read_bytes()
    os.symlink(flair, tmp_path / "link.nii.gz")
    os.link(flair, tmp_path / "hard.nii.gz")
    (tmp_path / "sub").mkdir()
    spellings = [str(flair), str(tmp_path / "sub" / ".." / flair.name), str(tmp_path / "link.nii.gz"),
                 str(tmp_path / "hard.nii.gz")]
    for out in spellings:
        # --model names no model: the output is refused before the model is even looked at.
        assert main(["predict", "--model", str(tmp_path / "no-model"), "--flair", str(flair),
                     "--t1ce", str(paths["t1ce"]), "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to overwrite an input" in err[0] and "--flair" in err[0], err
        # --server: refused before reading the inputs or connecting (nothing listens on port 9).
        with pytest.raises(ValueError, match="refusing to overwrite an input"):
            predict_nifti_remote("127.0.0.1:9", "m", {"flair": str(flair)}, out, protocol="rest", timeout=1)
    assert flair.read_bytes() == original
    # An existing folder is no output file either.
    assert main(["predict", "--model", str(tmp_path / "no-model"), "--flair", str(flair),
                 "--out", str(tmp_path / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_flair.nii.gz", "case_t1ce.nii.gz", "hard.nii.gz",
                                                          "link.nii.gz", "sub"]


def test_write_nifti_labels_leaves_no_partial_file(tmp_path, monkeypatch):
    from shaspec_tf import fileio
    from shaspec_tf.segment_nifti import nifti_inputs, read_nifti_case, write_nifti_labels

    paths = _nifti_inputs(tmp_path, names=("flair",))
    given = nifti_inputs({"flair": str(paths["flair"])})
    out = tmp_path / "pred" / "seg.nii.gz"
    record = read_nifti_case(given, str(out))
    labels = np.zeros(record.image.shape[:3], np.uint8)
    # A killed run's partial file (a process that no longer exists on this host) is cleaned up by the next write.
    out.parent.mkdir()
    stale = out.parent / f".seg.nii.gz.partial-{fileio.host_name()}-99999999-deadbeef.nii.gz"
    stale.write_bytes(b"half a label map")

    real_save = nib.save

    def failing_save(image, filename):
        real_save(image, filename)
        raise OSError("No space left on device")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        write_nifti_labels(labels, record, given, str(out))
    assert list(out.parent.iterdir()) == []  # neither the stale partial nor this run's
    monkeypatch.setattr(nib, "save", real_save)
    result = write_nifti_labels(labels, record, given, str(out))
    assert result["label_voxels"] == {0: int(np.prod(record.original_shape))}
    assert [p.name for p in out.parent.iterdir()] == ["seg.nii.gz"]


def test_load_trained_names_garbage_files(trained, tmp_path, capsys):
    from shaspec_tf.trained import load_trained

    config_text = (trained / "shaspec" / "model_config.json").read_text()
    weights = (trained / "shaspec" / "model.weights.h5").read_bytes()
    for name, content in (("not-json", b"{\"preset\": "), ("binary", b"\xff\xfe\x00garbage"), ("a-list", b"[1, 2]"),
                          ("no-preset", b"{\"task\": \"segmentation\"}"), ("no-task", b"{\"preset\": \"tiny\"}"),
                          ("bad-option", b"{\"preset\": \"tiny\", \"task\": \"segmentation\", \"bogus\": 1}")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_config.json").write_bytes(content)
        (folder / "model.weights.h5").write_bytes(weights)
        with pytest.raises(ValueError) as info:
            load_trained(str(folder))
        message = str(info.value)
        assert str(folder / "model_config.json") in message and len(message.splitlines()) == 1, (name, message)
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "model_config.json").write_text(config_text)
    with pytest.raises(FileNotFoundError, match="model.weights.h5"):
        load_trained(str(folder))
    (folder / "model.weights.h5").mkdir()
    with pytest.raises(ValueError, match="model.weights.h5"):
        load_trained(str(folder))
    # Through the command line: one plain line naming the file.
    assert main(["predict", "--model", str(tmp_path / "a-list"), "--flair", str(tmp_path / "f.nii.gz"),
                 "--out", str(tmp_path / "seg.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shaspec predict: error: " + str(tmp_path / "a-list"))


def test_evaluate_refuses_a_folder_it_did_not_write(trained, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "metrics.json").write_text("my own metrics")
    args = ["evaluate", "--model", str(trained / "shaspec"), "--data", str(trained / "data"), "--out", str(out),
            "--roi", "32,32,32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by shaspec" in err[0]
    assert (out / "metrics.json").read_text() == "my own metrics" and len(list(out.iterdir())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging folder left
    # Two --model folders of the same name would share a report subfolder.
    assert main(["evaluate", "--model", str(trained / "shaspec"), "--model", str(trained / "shaspec") + "/",
                 "--data", str(trained / "data"), "--out", str(tmp_path / "other")]) == 2
    assert "different names" in capsys.readouterr().err


def test_evaluate_names_a_corrupt_record_file(trained, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    record_file = data / "eval" / "data-00000-of-00001.tfrecord"
    corrupt = bytearray(record_file.read_bytes())
    corrupt[len(corrupt) * 3 // 4] ^= 0xFF  # inside the second record's payload: its CRC no longer matches
    record_file.write_bytes(bytes(corrupt))
    assert main(["evaluate", "--model", str(trained / "shaspec"), "--data", str(data), "--out",
                 str(tmp_path / "report"), "--roi", "32,32,32"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]  # progress
    assert len(err) == 1 and err[0].startswith(f"shaspec evaluate: error: {record_file}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no report, no staging folder
