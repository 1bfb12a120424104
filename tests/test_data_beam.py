"""``shaspec prepare brats`` as a Beam pipeline (DirectRunner, multi-processing) on small phantom cases."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf.cli import main
from shaspec_tf.data.beam_brats import prepare_brats, split_of
from shaspec_tf.data.brats import discover_cases, load_case, preprocess
from shaspec_tf.data.phantom import write_phantom_dataset
from shaspec_tf.data.schema import brats_record_from_example

pytestmark = pytest.mark.tensorflow
SHAPE = (24, 32, 32)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    write_phantom_dataset(root, 4, shape=SHAPE, seed=3, drop_rate=0.3, progress=False)
    bad = root / "Phantom_0003" / "Phantom_0003_t2.nii.gz"
    if not bad.exists():  # make sure the broken file exists whatever the drops
        bad = next((root / "Phantom_0003").glob("*_*.nii.gz"))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated gzip: this case must be rejected, not crash the job
    return root, bad


def read_split(folder, split):
    records = []
    for path in sorted(tf.io.gfile.glob(f"{folder}/{split}/*.tfrecord")):
        records += [brats_record_from_example(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    return records


def test_pipeline_writes_records_manifest_and_rejections(cases, tmp_path):
    root, bad = cases
    out = tmp_path / "records"
    manifest = prepare_brats(str(root), str(out), eval_fraction=0.5, shards=2, workers=2)
    assert manifest["discovered"] == 4 and manifest["written"] == 3
    assert [r["case_id"] for r in manifest["rejected"]] == ["Phantom_0003"]
    assert bad.name in manifest["rejected"][0]["reason"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    written = {r.case_id: r for split in ("train", "eval") for r in read_split(out, split)}
    assert sorted(written) == ["Phantom_0000", "Phantom_0001", "Phantom_0002"]
    for split in ("train", "eval"):
        assert sorted(manifest["splits"][split]["case_ids"]) == sorted(
            r.case_id for r in read_split(out, split))
        assert all(split_of(cid, 0.5) == split for cid in manifest["splits"][split]["case_ids"])
    # the records hold exactly what the reader and preprocessing produce
    for files in discover_cases(root)[:3]:
        expected = preprocess(load_case(files, require_label=True))
        got = written[files.case_id]
        np.testing.assert_array_equal(got.image, expected.image)
        np.testing.assert_array_equal(got.label, expected.label)
        np.testing.assert_array_equal(got.modality_mask, files.modality_mask)
    assert sorted(os.listdir(tmp_path)) == ["records"]  # no staging folder left behind


def test_rerun_replaces_output_and_strict_mode_fails_without_output(cases, tmp_path):
    root, _ = cases
    out = tmp_path / "records"
    prepare_brats(str(root), str(out), eval_fraction=0.0, shards=3, workers=1)
    assert len(os.listdir(out / "train")) == 3
    prepare_brats(str(root), str(out), eval_fraction=0.0, shards=1, workers=1)
    assert os.listdir(out / "train") == ["data-00000-of-00001.tfrecord"]  # no stale shards
    before = (out / "manifest.json").read_text()
    with pytest.raises(Exception, match="Phantom_0003"):
        prepare_brats(str(root), str(out), strict=True, workers=1)
    assert (out / "manifest.json").read_text() == before  # the earlier complete output is untouched
    assert sorted(os.listdir(tmp_path)) == ["records"]


def test_refuses_to_replace_a_foreign_folder(cases, tmp_path):
    root, _ = cases
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier"):
        prepare_brats(str(root), str(foreign), workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["prepare", "brats", "--input", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent" in err[0]


def test_beam_options_pass_through_and_default_to_multiprocessing():
    from shaspec_tf.data.beam_brats import _pipeline_options

    default = _pipeline_options([], 2).get_all_options()
    assert (default["runner"], default["direct_running_mode"], default["direct_num_workers"]) == (
        "DirectRunner", "multi_processing", 2)
    dataflow = _pipeline_options(["--runner", "DataflowRunner", "--project", "p", "--region", "r"], 2)
    opts = dataflow.get_all_options(drop_default=True)
    assert opts["runner"] == "DataflowRunner" and opts["project"] == "p" and opts["region"] == "r"
    assert "direct_running_mode" not in opts
