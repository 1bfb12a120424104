"""The file layer (shaspec_tf.fileio) against the Cloud Storage emulator: what the rest of the project relies on when
a path is ``gs://...``. Runs in a child process, where TensorFlow picks the emulator-aware ``gs://`` filesystem."""
import pytest
from conftest import run_with_gcs

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow]


def test_file_layer_reads_writes_and_replaces_on_a_bucket(gcs):
    bucket = gcs.create_bucket("fileio")
    out = run_with_gcs(gcs, f"""
        import json, os
        from shaspec_tf import fileio as F
        b = "{bucket}"
        F.atomic_write_json(F.join(b, "x", "a.json"), {{"a": 1}})
        big = os.urandom(700_000)  # over the size at which the gs:// reader takes several requests
        F.atomic_write(F.join(b, "x", "big.bin"), big)
        res = {{"json": F.read_json(b + "/x/a.json"), "isdir": F.isdir(b + "/x"), "exists": F.exists(b + "/x"),
               "isfile": F.isfile(b + "/x/a.json"), "listdir": F.listdir(b + "/x"),
               "big_ok": F.read_bytes(b + "/x/big.bin") == big, "size": F.size(b + "/x/big.bin")}}
        staging = F.staging_dir(b + "/out")
        F.atomic_write(F.join(staging, "f1.bin"), b"1" * 10)
        F.atomic_write(F.join(staging, "sub", "f2.txt"), "hello")
        F.replace_dir(staging, b + "/out", "test-kind")
        res["first"] = sorted(F.list_files(b + "/out"))
        res["kind"] = F.read_marker(b + "/out")["kind"]
        staging = F.staging_dir(b + "/out")
        F.atomic_write(F.join(staging, "g.txt"), "new")
        F.replace_dir(staging, b + "/out", "test-kind")
        res["second"] = sorted(F.list_files(b + "/out"))
        F.atomic_write(b + "/theirs/thesis.tex", "mine")
        try:
            F.ensure_replaceable(b + "/theirs", "test-kind")
            res["refused"] = False
        except FileExistsError:
            res["refused"] = True
        with F.local_copy(b + "/out/g.txt") as local:
            res["local"] = open(local).read()
        res["glob"] = F.glob(b + "/out/*.txt")
        res["walk"] = [[r, d, f] for r, d, f in F.walk(b + "/out")]
        print(json.dumps(res))
    """)
    assert out["json"] == {"a": 1} and out["isdir"] and out["exists"] and out["isfile"]
    assert out["listdir"] == ["a.json", "big.bin"] and out["big_ok"] and out["size"] == 700_000
    assert out["first"] == ["f1.bin", "sub/f2.txt"] and out["kind"] == "test-kind"
    assert out["second"] == ["g.txt"], "the old output was replaced, not merged"
    assert out["refused"], "a folder we did not write is never replaced"
    assert out["local"] == "new" and out["glob"] == [f"{bucket}/out/g.txt"]
    assert out["walk"] == [[f"{bucket}/out", [], [".shaspec-output.json", "g.txt"]]]
    names = gcs.list_objects("fileio")
    assert not [n for n in names if ".partial-" in n or ".old-" in n], names
