"""The BraTS Beam job against the Cloud Storage emulator: cases read from a bucket and records written into one by
Beam's workers through Beam's own GCS IO (``apache_beam.io.gcp.gcsio``, google-cloud-storage), the rest of the
output (staging, manifest, marker) through the file layer. In a child process, as every cloud test.

Beam's GCS IO asks ``google.auth.default()`` for credentials in every process, retrying four times (about 30 s of
back-off) before it connects anonymously, and honours neither ``--no_auth`` nor an environment variable for
anonymous access. The child therefore gets application default credentials that need no network (an
``authorized_user`` file holding a token that never expires), which the emulator accepts like anything else."""
import json

import pytest
from conftest import run_with_gcs

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow]

CREDENTIALS = {"type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
               "refresh_token": "emulator", "token": "emulator", "expiry": "2999-01-01T00:00:00Z"}


def test_brats_job_reads_cases_from_and_writes_records_into_a_bucket(gcs, tmp_path):
    bucket = gcs.create_bucket("beam-brats")
    credentials = tmp_path / "adc.json"
    credentials.write_text(json.dumps(CREDENTIALS))
    out = run_with_gcs(gcs, f"""
        import json, os
        os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = "{credentials}"
        import numpy as np
        import apache_beam as beam
        import tensorflow as tf
        from apache_beam.io.filesystems import FileSystems
        from shaspec_tf import fileio
        from shaspec_tf.data.beam_brats import prepare_brats
        from shaspec_tf.data.brats import discover_cases, load_case, preprocess
        from shaspec_tf.data.phantom import write_phantom_dataset
        from shaspec_tf.data.schema import brats_record_from_example

        local = "{tmp_path}/cases"
        write_phantom_dataset(local, 3, shape=(24, 32, 32), seed=7, drop_rate=0.3, progress=False)
        fileio.upload_tree(local, "{bucket}/cases")
        # two DirectRunner worker processes read the NIfTI cases from the bucket and write the shards into it
        manifest = prepare_brats("{bucket}/cases", "{bucket}/records", eval_fraction=0.5, shards=2, workers=2)
        shards = sorted(m.path for m in FileSystems.match(["{bucket}/records/*/data-*"])[0].metadata_list)
        with beam.Pipeline() as p:  # Beam's TFRecord source on the bucket
            ids = (p | beam.io.ReadFromTFRecord("{bucket}/records/*/data-*.tfrecord")
                   | beam.Map(lambda r: brats_record_from_example(r).case_id))
            _ = ids | beam.io.WriteToText("{tmp_path}/ids", num_shards=1, shard_name_template="")
        same = True
        for path in shards:
            for raw in tf.data.TFRecordDataset(path):
                got = brats_record_from_example(raw.numpy())
                files = next(c for c in discover_cases(local) if c.case_id == got.case_id)
                want = preprocess(load_case(files, require_label=True))
                same &= bool(np.array_equal(got.image, want.image) and np.array_equal(got.label, want.label)
                             and np.array_equal(got.modality_mask, files.modality_mask))
        print(json.dumps({{"manifest": manifest, "shards": shards, "same": same,
                           "ids": sorted(open("{tmp_path}/ids").read().split()),
                           "marker": fileio.read_marker("{bucket}/records"),
                           "files": fileio.list_files("{bucket}/records")}}))
    """)
    manifest = out["manifest"]
    assert manifest["source"] == f"{bucket}/cases" and manifest["written"] == 3 and not manifest["rejected"]
    assert out["shards"] == [f"{bucket}/records/{split}/data-0000{i}-of-00002.tfrecord"
                             for split in ("eval", "train") for i in range(2)]
    assert out["same"] and out["ids"] == ["Phantom_0000", "Phantom_0001", "Phantom_0002"]
    assert out["marker"]["kind"] == "brats-records" and out["marker"]["files"] == out["files"]
    names = gcs.list_objects("beam-brats", "records")
    assert "records/manifest.json" in names
    assert not [n for n in names if ".partial-" in n or "_meta" in n or "beam-temp" in n], names
    assert not [n for n in gcs.list_objects("beam-brats") if ".partial-" in n or "beam-temp" in n]
