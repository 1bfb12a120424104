"""The local TFX pipeline (LocalDagRunner) with its root and its inputs on the Cloud Storage emulator: the tiny
AV-MNIST branch reads its sources from the bucket, writes every artifact there and pushes a SavedModel into the
bucket; ML Metadata stays a local SQLite file."""
import os
import subprocess
import sys

import pytest
from conftest import run_with_gcs

from pipeline import configs

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the recordings the tiny AV-MNIST plan draws (as tests/test_vertex_entrypoint.py uploads)
WAVS = [f"{d}_theo_{i}.wav" for d in range(10) for i in (5, 6, 15, 16, 17, 18, 19)]


def test_the_local_pipeline_runs_with_its_root_and_data_on_a_bucket(gcs, tmp_path):
    bucket = gcs.create_bucket("local-pipeline")
    data = configs.avmnist_data_dir()
    run_with_gcs(gcs, f"""
        import os
        from shaspec_tf import fileio
        data, bucket = {data!r}, {bucket!r}
        fileio.copy(os.path.join(data, "mnist8k.npz"), bucket + "/avmnist/mnist8k.npz")
        for name in {WAVS!r}:
            fileio.copy(os.path.join(data, "fsdd", "recordings", name), bucket + "/avmnist/fsdd/recordings/" + name)
        print("{{}}")
    """)
    metadata = tmp_path / "metadata.db"
    gcs_env = {**gcs.env(), "SHASPEC_DATA": f"{bucket}/avmnist"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "pipeline", "local_runner.py"), "--tiny",
                           "--tasks", "avmnist", "--root", f"{bucket}/shaspec", "--metadata", str(metadata)],
                          cwd=str(tmp_path), env={**os.environ, **gcs_env}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    assert metadata.exists(), "ML Metadata is a local file"
    assert f"root {bucket}/shaspec" in done.stdout
    names = gcs.list_objects("local-pipeline", "shaspec/")
    pushed = [n for n in names if n.startswith("shaspec/serving/") and n.endswith("/saved_model.pb")]
    assert len(pushed) == 1, pushed
    assert f"pushed model  {bucket}/{os.path.dirname(pushed[0])}" in done.stdout
    assert any(n.startswith("shaspec/AvMnistExampleGen") or "ExampleGen" in n for n in names)
    assert any(n.endswith("verdict.json") for n in names), "the evaluator's report lands in the bucket"
    assert not (tmp_path / "shaspec_pipeline").exists(), "nothing went to a local default root"
