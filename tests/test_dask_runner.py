"""``shaspec prepare brats --runner DaskRunner``: the BraTS Beam job on a ``dask.distributed`` cluster of two worker
processes (Beam's experimental Dask runner) writes the records the DirectRunner writes."""
import os

import numpy as np
import pytest
import tensorflow as tf

from shaspec_tf import fileio
from shaspec_tf.cli import main
from shaspec_tf.data.beam_brats import KIND, RUNNERS, _pipeline_options, output_files, prepare_brats, shard_plan
from shaspec_tf.data.phantom import write_phantom_dataset
from shaspec_tf.data.schema import brats_record_from_example

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti")
    write_phantom_dataset(root, 4, shape=(24, 32, 32), seed=5, drop_rate=0.3, progress=False)
    bad = next((root / "Phantom_0001").glob("*_*.nii.gz"))
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: rejected by a worker, listed in the manifest
    return str(root)


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None)
    try:
        yield cluster
    finally:
        cluster.close()


def shards(folder):
    """``{shard file: {case_id: record}}`` of a ``prepare brats`` output."""
    out = {}
    for name in fileio.list_files(folder):
        if name.endswith(".tfrecord"):
            records = [brats_record_from_example(r.numpy()) for r in tf.data.TFRecordDataset(f"{folder}/{name}")]
            out[name] = {r.case_id: r for r in records}
    return out


def test_the_job_on_a_dask_cluster_writes_what_the_direct_runner_writes(cases, cluster, tmp_path, capsys):
    from dask.distributed import Client, get_task_stream

    direct_out, dask_out = str(tmp_path / "direct"), str(tmp_path / "dask")
    direct = prepare_brats(cases, direct_out, eval_fraction=0.5, shards=2,
                           beam_args=["--direct_running_mode=in_memory"])
    with Client(cluster.scheduler_address) as client, get_task_stream(client) as stream:
        assert main(["prepare", "brats", "--input", cases, "--output", dask_out, "--eval-fraction", "0.5",
                     "--shards", "2", "--runner", "DaskRunner", "--dask-address", cluster.scheduler_address]) == 0
    assert len({task["worker"] for task in stream.data}) == 2, "both worker processes ran part of the job"
    assert "wrote 3 of 4 cases" in capsys.readouterr().out
    dask = fileio.read_json(f"{dask_out}/manifest.json")
    assert [r["case_id"] for r in dask["rejected"]] == ["Phantom_0001"]
    assert {**dask, "seconds": 0} == {**direct, "seconds": 0}
    got, want = shards(dask_out), shards(direct_out)
    assert sorted(got) == sorted(want) == [f"{split}/data-0000{i}-of-00002.tfrecord"
                                           for split in ("eval", "train") for i in range(2)]
    plan, paths = shard_plan(["Phantom_0000", "Phantom_0002", "Phantom_0003"], 0.5, 2), output_files(dask_out, 2)
    for name in got:  # each case in the shard the plan gives it, whatever the runner
        key = paths.index(f"{dask_out}/{name}")
        assert sorted(got[name]) == sorted(want[name]) == sorted(c for c, k in plan.items() if k == key), name
        for case_id, record in got[name].items():
            np.testing.assert_array_equal(record.image, want[name][case_id].image)
            np.testing.assert_array_equal(record.label, want[name][case_id].label)
            np.testing.assert_array_equal(record.modality_mask, want[name][case_id].modality_mask)
    assert fileio.read_marker(dask_out)["kind"] == KIND
    assert sorted(os.listdir(tmp_path)) == ["dask", "direct"]  # no staging folder, no Beam temp files left


def test_runner_options():
    from apache_beam.runners.dask.dask_runner import DaskOptions

    options = _pipeline_options(["--runner", "DaskRunner", "--dask-address", "tcp://h:8786"], 2)
    everything = options.get_all_options(drop_default=True)
    assert everything["runner"] == RUNNERS["DaskRunner"] and "direct_running_mode" not in everything
    dask = options.view_as(DaskOptions)
    assert (dask.address, dask.partition_size, dask.npartitions) == ("tcp://h:8786", 1, None)
    # the keyword arguments win over --runner in the Beam arguments; Beam's own Dask options pass through
    options = _pipeline_options(["--runner=DataflowRunner", "--dask_npartitions=3"], 2, runner="DaskRunner",
                                dask_address="tcp://a:1")
    dask = options.view_as(DaskOptions)
    assert options.get_all_options()["runner"] == RUNNERS["DaskRunner"]
    assert (dask.address, dask.partition_size, dask.npartitions) == ("tcp://a:1", None, 3)
    with pytest.raises(ValueError, match="--dask-address is an option of --runner DaskRunner"):
        _pipeline_options(["--dask-address=tcp://h:1"], 2)
