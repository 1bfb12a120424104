"""The data layer on a bucket (the Cloud Storage emulator, tests/gcs_emulator.py): phantom BraTS cases written to
``gs://`` by ``shaspec prepare phantom``, discovered and read back from there with every NIfTI check in force, and
the example gens' input fingerprint (``shaspec_tf.data.files.input_fingerprint``) noticing a rewritten or removed
object there; AV-MNIST built by ``shaspec prepare avmnist`` from sources in a bucket into a bucket. What touches
``gs://`` runs in a child process (``run_with_gcs``), where TensorFlow picks the emulator-aware file system."""
import io
import os
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import run_with_gcs

pytestmark = [pytest.mark.cloud, pytest.mark.tensorflow]

SHARED = os.environ.get("SHASPEC_DATA") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                       "shared", "data")      # the real MNIST digits and FSDD WAVs
SHAPE = "16,32,32"


def put(gcs, bucket: str, name: str, data: bytes) -> None:
    """Upload one object straight through the emulator's JSON API (no TensorFlow in this process)."""
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{gcs.url}/upload/storage/v1/b/{bucket}/o?{query}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=30).read()


def test_prepare_phantom_into_a_bucket_then_discover_read_and_fingerprint_it(gcs):
    bucket = gcs.create_bucket("cloud-data-phantom")
    out = run_with_gcs(gcs, f"""
        import gzip, hashlib, json
        import nibabel as nib, numpy as np
        from shaspec_serving.cli import main
        from shaspec_tf import fileio as F
        from shaspec_tf.data import brats
        from shaspec_tf.data.files import input_fingerprint   # components.example_gens.fingerprint
        from shaspec_tf.data.nifti import read_volume
        from shaspec_tf.data.phantom import write_phantom_dataset
        b, out = "{bucket}", "{bucket}/phantoms"

        def digest(record):
            d = hashlib.sha256()
            for a in (record.image, record.label, record.affine, np.asarray(record.modality_mask)):
                d.update(np.ascontiguousarray(a).tobytes())
            return d.hexdigest()

        def error(fn, *args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as e:
                return [type(e).__name__, str(e)]
            return None

        res = {{"rc": main(["prepare", "phantom", "--out", out, "--cases", "2", "--shape", "{SHAPE}", "--seed", "3",
                            "--drop-rate", "0.3"])}}
        fingerprints = [input_fingerprint([out])]
        cases = brats.discover_cases(out + "/")
        res["cases"] = [[c.case_id, c.modality_mask.tolist(), c.folder, c.seg] for c in cases]
        res["records"] = {{c.case_id: digest(brats.load_case(c, require_label=True)) for c in cases}}
        same = []   # each object read from the bucket as nibabel reads a local copy of it
        for path in [p for c in cases for p in [*c.paths.values(), c.seg] if p]:
            data, affine, zooms = read_volume(path)
            with F.local_copy(path, suffix=".nii.gz") as local:
                image = nib.load(local)
                same.append(bool(np.array_equal(data, image.get_fdata(dtype=np.float32)) and np.array_equal(
                    affine, image.affine) and zooms == tuple(float(z) for z in image.header.get_zooms())))
        res["same"] = same
        res["marker"] = sorted(F.read_marker(out)["files"]) == sorted(F.list_files(out))
        res["missing"] = error(brats.discover_cases, b + "/nowhere")

        # the NIfTI checks, on objects: a header claiming 1200^3 voxels, a truncated stream
        header = nib.Nifti1Header()
        header.set_data_shape((1200, 1200, 1200))
        header.set_data_dtype(np.int16)
        F.atomic_write(b + "/huge/Huge/Huge_flair.nii.gz", gzip.compress(header.binaryblock + bytes(20)))
        res["huge"] = error(brats.load_case, brats.discover_cases(b + "/huge")[0])
        whole = F.read_bytes(cases[1].seg)
        F.atomic_write(b + "/cut/Cut/Cut_flair.nii.gz", F.read_bytes(cases[1].paths["flair"]))
        F.atomic_write(b + "/cut/Cut/Cut_seg.nii.gz", whole[: len(whole) // 2])
        res["cut"] = error(brats.load_case, brats.discover_cases(b + "/cut")[0])

        # a folder that is not ours is refused and left as it was
        F.atomic_write(b + "/theirs/thesis.tex", "precious")
        res["theirs_rc"] = main(["prepare", "phantom", "--out", b + "/theirs", "--cases", "1", "--shape", "{SHAPE}"])
        res["theirs"] = [F.listdir(b + "/theirs"), F.read_text(b + "/theirs/thesis.tex")]

        fingerprints.append(input_fingerprint([out + "/"]))      # objects elsewhere in the bucket do not count
        F.atomic_write(out + "/phantoms.json", F.read_bytes(out + "/phantoms.json"))   # rewritten, same size
        fingerprints.append(input_fingerprint([out]))

        # a run killed while uploading case 1: skip_existing keeps case 0 and rewrites case 1
        kept = {{p: F.stat(p) for p in cases[0].paths.values() if p}}
        lost = cases[1].paths["flair"]
        F.remove(lost)
        fingerprints.append(input_fingerprint([out]))
        res["fingerprints"] = fingerprints
        write_phantom_dataset(out, 2, shape=({SHAPE}), seed=3, drop_rate=0.3, skip_existing=True, progress=False)
        res["kept"] = all(F.stat(p) == s for p, s in kept.items())
        res["restored"] = F.isfile(lost) and digest(
            brats.load_case(brats.discover_cases(out)[1], require_label=True)) == res["records"]["Phantom_0001"]
        # case 1 rewritten with a single sequence: the objects of the sequences it lost go
        manifest = write_phantom_dataset(out, [1], shape=({SHAPE}), seed=3, drop_rate=1.0, progress=False)
        res["rewritten"] = [manifest["cases"][0]["present"], F.listdir(out + "/Phantom_0001"),
                            brats.discover_cases(out)[1].modality_mask.tolist()]
        res["marker_after"] = sorted(F.read_marker(out)["files"]) == sorted(F.list_files(out))
        print(json.dumps(res))
    """)
    assert out["rc"] == 0
    assert [case for case, _, _, _ in out["cases"]] == ["Phantom_0000", "Phantom_0001"] and len(out["records"]) == 2
    assert len(out["same"]) >= 6 and all(out["same"]), out["same"]
    assert [0, 0, 0, 0] not in [mask for _, mask, _, _ in out["cases"]]
    assert [folder for _, _, folder, _ in out["cases"]] == [f"{bucket}/phantoms/Phantom_0000",
                                                           f"{bucket}/phantoms/Phantom_0001"]
    assert out["cases"][1][3] == f"{bucket}/phantoms/Phantom_0001/Phantom_0001_seg.nii.gz"
    assert out["marker"], "the ownership marker lists exactly what the bucket folder holds"
    assert out["missing"][0] == "FileNotFoundError" and "nowhere" in out["missing"][1]
    kind, message = out["huge"]
    assert kind == "NiftiError" and "(1200, 1200, 1200)" in message and "above the limit" in message, message
    assert message.startswith(f"{bucket}/huge/Huge/Huge_flair.nii.gz: ") and "\n" not in message
    kind, message = out["cut"]
    assert kind == "NiftiError" and "Cut_seg.nii.gz" in message and "truncated" in message, message
    assert out["theirs_rc"] == 2 and out["theirs"] == [["thesis.tex"], "precious"]
    assert out["kept"] and out["restored"]
    same, later, rewritten, removed = out["fingerprints"]
    assert same == later, "the same objects give the same fingerprint, whatever else the bucket gained meanwhile"
    assert len({same, rewritten, removed}) == 3, "a rewritten or removed object changes it"
    (present,), files, mask = out["rewritten"]
    assert files == sorted([f"Phantom_0001_{present}.nii.gz", "Phantom_0001_seg.nii.gz"]) and sum(mask) == 1
    assert out["marker_after"]
    names = gcs.list_objects("cloud-data-phantom", "phantoms/")
    assert not [n for n in names if ".partial-" in n or ".old-" in n or "shaspec-phantom" in n], names
    assert "phantoms/phantoms.json" in names and "phantoms/.shaspec-output.json" in names


def test_prepare_avmnist_from_sources_in_a_bucket_into_a_bucket(gcs):
    bucket = gcs.create_bucket("cloud-data-avmnist")
    with np.load(os.path.join(SHARED, "mnist8k.npz")) as data:
        images, labels = data["images"], data["labels"]
    rows = np.concatenate([np.flatnonzero(labels == digit)[:3] for digit in range(10)])
    npz = io.BytesIO()
    np.savez(npz, images=images[rows], labels=labels[rows])
    put(gcs, "cloud-data-avmnist", "src/mnist8k.npz", npz.getvalue())
    for digit in range(10):
        for index in (5, 15):
            name = f"{digit}_theo_{index}.wav"
            with open(os.path.join(SHARED, "fsdd", "recordings", name), "rb") as f:
                put(gcs, "cloud-data-avmnist", f"src/fsdd/recordings/{name}", f.read())
    out = run_with_gcs(gcs, f"""
        import json
        import tensorflow as tf
        from shaspec_serving.cli import main
        from shaspec_tf import fileio as F
        from shaspec_tf.data import avmnist, schema
        b = "{bucket}"
        res = {{"rc": main(["prepare", "avmnist", "--out", b + "/avmnist", "--data-dir", b + "/src", "--speakers",
                            "theo", "--train-indices", "15:16", "--test-indices", "5:6", "--shards", "2"])}}
        manifest = F.read_json(b + "/avmnist/manifest.json")
        res["sources"], res["rows"] = manifest["sources"], manifest["mnist_rows"]
        res["kind"] = F.read_marker(b + "/avmnist")["kind"]
        res["records"] = {{}}
        for split in ("train", "test"):
            files = avmnist.tfrecord_files(b + "/avmnist", split)
            for r in tf.data.TFRecordDataset(files).map(schema.parse_avmnist_example):
                res["records"][r["sample_id"].numpy().decode()] = [
                    int(r["label"].numpy()), r["modality_mask"].numpy().tolist(),
                    float(abs(r["audio"].numpy()).sum()), (r["image"].numpy() * 255).round().astype(int).tolist()]
        print(json.dumps(res))
    """)
    assert out["rc"] == 0 and out["kind"] == "avmnist-records"
    assert out["sources"] == {"mnist_npz": f"{bucket}/src/mnist8k.npz", "fsdd_dir": f"{bucket}/src/fsdd/recordings"}
    expected = {f"{split}/{digit}_theo_{index}" for split, index in (("train", 15), ("test", 5)) for digit in range(10)}
    assert set(out["records"]) == expected
    small = images[rows]
    for sample, (label, mask, audio, image) in out["records"].items():
        assert label == int(sample.split("/")[1][0]) and mask == [1, 1] and audio > 0, sample
        assert np.array_equal(np.asarray(image).reshape(28, 28), small[out["rows"][sample]]), sample
    names = gcs.list_objects("cloud-data-avmnist", "avmnist/")
    assert sorted(n for n in names if n.endswith(".tfrecord")) == [
        f"avmnist/{split}-0000{i}-of-00002.tfrecord" for split in ("test", "train") for i in range(2)]
    assert not [n for n in names if ".partial-" in n], names
