"""``shaspec prepare brats`` as a Beam pipeline (DirectRunner, multi-processing) on small phantom cases."""
import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf import fileio
from shaspec_tf.cli import main
from shaspec_tf.data.beam_brats import (KIND, StrictCaseError, output_files, prepare_brats, shard_plan, split_of,
                                        write_cases)
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
    marker = fileio.read_marker(str(out))
    assert marker["kind"] == KIND and marker["files"] == fileio.list_files(str(out))


def test_rerun_replaces_output_and_strict_mode_fails_without_output(cases, tmp_path):
    root, _ = cases
    out = tmp_path / "records"
    prepare_brats(str(root), str(out), eval_fraction=0.0, shards=3, workers=1)
    assert len(os.listdir(out / "train")) == 3
    prepare_brats(str(root), str(out), eval_fraction=0.0, shards=1, workers=1)
    assert os.listdir(out / "train") == ["data-00000-of-00001.tfrecord"]  # no stale shards
    before = (out / "manifest.json").read_text()
    with pytest.raises(StrictCaseError, match="Phantom_0003") as info:   # one line, not Beam's traceback
        prepare_brats(str(root), str(out), strict=True, workers=1)
    assert "\n" not in str(info.value) and "1 of 4 cases rejected" in str(info.value)
    assert [r["case_id"] for r in info.value.rejected] == ["Phantom_0003"]
    assert (out / "manifest.json").read_text() == before  # the earlier complete output is untouched
    assert sorted(os.listdir(tmp_path)) == ["records"]


def test_refuses_to_replace_a_foreign_folder(cases, tmp_path):
    root, _ = cases
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare_brats(str(root), str(foreign), workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_manifest_alone_does_not_make_a_folder_ours(cases, tmp_path, capsys):
    """A user's folder holding a manifest.json (even one that looks like ours) is refused before any work."""
    root, _ = cases
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "manifest.json").write_text("{}")
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        prepare_brats(str(root), str(user), workers=1)
    (user / "manifest.json").write_text(json.dumps({"schema_version": 1, "task": "brats", "shards": 1}))
    assert main(["prepare", "brats", "--input", str(root), "--output", str(user), "--workers", "1"]) == 2
    (tmp_path / "afile").write_text("x")
    assert main(["prepare", "brats", "--input", str(root), "--output", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "refusing" in err[0] and "not a folder" in err[1]
    assert sorted(os.listdir(user)) == ["manifest.json", "src", "thesis.tex"]
    assert (user / "thesis.tex").read_text() == "precious" and (tmp_path / "afile").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["afile", "project"]              # no partial folder either


def test_options_are_checked_before_any_work(cases, tmp_path, capsys):
    root, _ = cases
    out = tmp_path / "records"
    for bad in (dict(eval_fraction=5), dict(eval_fraction=1.0), dict(eval_fraction=-0.1),
                dict(eval_fraction=float("nan")), dict(shards=0), dict(workers=0), dict(max_voxels=0),
                dict(runner="NoSuchRunner"), dict(dask_address="tcp://127.0.0.1:1"),
                dict(beam_args=["--runner", "DirectRunner", "--dask-address", "tcp://127.0.0.1:1"])):
        with pytest.raises(ValueError) as info:
            prepare_brats(str(root), str(out), **bad)
        assert "\n" not in str(info.value), bad
    assert main(["prepare", "brats", "--input", str(root), "--output", str(out), "--eval-fraction", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[0, 1)" in err[0]
    assert main(["prepare", "brats", "--input", str(root), "--output", str(out), "--dask-address", "tcp://h:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dask-address is an option of --runner DaskRunner" in err[0]
    assert os.listdir(tmp_path) == []


def dead_partial(target):
    """A ``.NAME.partial-HOST-PID-*`` folder beside ``target`` as a killed run leaves it (its process is gone)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    path = fileio.partial_name(str(target)).replace(f"-{os.getpid()}-", f"-{proc.pid}-", 1)
    os.makedirs(os.path.join(path, "train"))
    with open(os.path.join(path, "train", "data-00000-of-00001.tfrecord"), "wb") as f:
        f.write(b"half")
    return os.path.basename(path)


def test_legacy_output_is_replaced_and_dead_runs_litter_cleaned(cases, tmp_path):
    root, _ = cases
    out = tmp_path / "records"
    (out / "train").mkdir(parents=True)                     # an output of this command from before markers
    (out / "train" / "data-00000-of-00002.tfrecord").write_bytes(b"")
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "task": "brats", "shards": 2}))
    dead = dead_partial(out)
    live = os.path.basename(fileio.staging_dir(str(out)))   # this process's: alive, so never touched
    manifest = prepare_brats(str(root), str(out), eval_fraction=0.0, workers=1)
    assert manifest["written"] == 3 and fileio.read_marker(str(out))["kind"] == KIND
    assert sorted(os.listdir(tmp_path)) == sorted(["records", live]), dead


def test_no_case_written_is_an_error_naming_the_reasons(cases, tmp_path, capsys):
    root, _ = cases
    out = tmp_path / "records"
    # every case over the voxel limit (--max-voxels reaches the Beam workers): nothing to write
    assert main(["prepare", "brats", "--input", str(root), "--output", str(out), "--workers", "1",
                 "--max-voxels", "1000"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "no case written, all 4 discovered cases were rejected" in err[0], err
    rejected = [line for line in captured.out.splitlines() if line.startswith("  rejected ")]
    assert len(rejected) == 4 and all("above the limit of 1,000" in line for line in rejected)
    assert os.listdir(tmp_path) == []                        # no output folder, no partial folder


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


def test_tfx_layout_gzip_shards_follow_the_plan(cases, tmp_path):
    """``write_cases`` as the TFX ExampleGen calls it: ``Split-<split>/data-*.gz`` (GZIP TFRecords), every shard
    written (empty when no case falls in it), each case in the shard :func:`shard_plan` gives it."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    root, _ = cases
    found = discover_cases(root)
    out = str(tmp_path / "examples")
    with beam.Pipeline(options=PipelineOptions(["--direct_running_mode=in_memory"])) as p:
        write_cases(p, found, out, eval_fraction=0.5, shards=3, split_dir="Split-{split}", suffix=".gz")
    paths = output_files(out, 3, "Split-{split}", ".gz")
    assert sorted(fileio.list_files(out)) == sorted(p[len(out) + 1:] for p in paths)
    plan = shard_plan([c.case_id for c in found], 0.5, 3)
    for key, path in enumerate(paths[:-2]):
        records = [brats_record_from_example(r.numpy()) for r in tf.data.TFRecordDataset(path, "GZIP")]
        assert sorted(r.case_id for r in records) == sorted(
            c for c, k in plan.items() if k == key and c != "Phantom_0003"), path
    for index, split in enumerate(("train", "eval")):  # each split's cases spread evenly over its own shards
        keys = [plan[c.case_id] for c in found if split_of(c.case_id, 0.5) == split]
        counts = [keys.count(index * 3 + i) for i in range(3)]
        assert sum(counts) == len(keys) and max(counts) - min(counts) <= 1, (split, keys)
    log = [json.loads(line) for line in fileio.read_text(paths[-2]).splitlines()]
    assert sorted(m["case_id"] for m in log) == ["Phantom_0000", "Phantom_0001", "Phantom_0002"]
    assert [json.loads(line)["case_id"] for line in fileio.read_text(paths[-1]).splitlines()] == ["Phantom_0003"]
