"""The AV-MNIST builder (``shaspec_tf.data.avmnist``) on a handful of the real MNIST digits and FSDD recordings in
``../shared/data`` (read in place, never copied into the repository), plus synthetic audio for the MFCC."""
import json
import os
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from shaspec_tf import fileio
from shaspec_tf.data import avmnist, schema

pytestmark = pytest.mark.tensorflow

DATA = Path(os.environ.get("SHASPEC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MNIST = DATA / "mnist8k.npz"
FSDD = DATA / "fsdd" / "recordings"
if not (MNIST.is_file() and FSDD.is_dir()):  # pragma: no cover
    pytest.skip(f"real AV-MNIST sources not found under {DATA}", allow_module_level=True)

SMALL = dict(speakers=("theo",), train_indices=range(15, 17), test_indices=range(5, 6), progress=False)


def read_split(out_dir, split):
    import tensorflow as tf

    files = avmnist.tfrecord_files(out_dir, split)
    records = []
    for f in tf.data.TFRecordDataset(files).map(schema.parse_avmnist_example):
        records.append({k: v.numpy() for k, v in f.items()})
    for r in records:
        r["sample_id"], r["speaker"] = r["sample_id"].decode(), r["speaker"].decode()
    return records


def all_bytes(out_dir):
    """Every file of a build but the ownership marker (it records when it was written)."""
    return {p.name: p.read_bytes() for p in sorted(Path(out_dir).iterdir()) if p.name != fileio.MARKER}


def dead_partial(target):
    """A ``.NAME.partial-HOST-PID-*`` folder beside ``target`` as a killed run leaves it (its process is gone)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    path = fileio.partial_name(str(target)).replace(f"-{os.getpid()}-", f"-{proc.pid}-", 1)
    os.makedirs(path)
    Path(path, "train-00000-of-00001.tfrecord").write_bytes(b"half")
    return Path(path)


def write_wav(path, signal, rate):
    pcm = np.clip(np.round(np.asarray(signal) * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(pcm.tobytes())
    return path


def tone(rate, seconds=1.0, freqs=(300.0, 700.0)):
    t = np.arange(int(rate * seconds)) / rate
    envelope = np.sin(np.pi * t / seconds) ** 2 * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return 0.3 * envelope * sum(np.sin(2 * np.pi * f * t) for f in freqs)


def fsdd_subset(folder, names):
    folder.mkdir()
    for name in names:
        os.symlink(FSDD / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("avmnist") / "out"
    manifest = avmnist.build_avmnist(MNIST, FSDD, out, shards={"train": 2, "test": 1}, **SMALL)
    return out, manifest


@pytest.fixture(scope="module")
def mnist():
    with np.load(MNIST) as data:
        return data["images"], data["labels"]


# -- the build ---------------------------------------------------------------------------------------------------------
def test_small_build_pairs_each_recording_with_its_digit(small_build, mnist):
    out, manifest = small_build
    images, labels = mnist
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == [fileio.MARKER, "manifest.json", "test-00000-of-00001.tfrecord",
                                                     "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    rows = manifest["mnist_rows"]
    seen = {}
    for split, indices in (("train", range(15, 17)), ("test", range(5, 6))):
        records = read_split(out, split)
        expected = {f"{split}/{d}_theo_{i}" for d in range(10) for i in indices}
        assert {r["sample_id"] for r in records} == expected and len(records) == len(expected)
        assert manifest["splits"][split]["count"] == len(expected)
        assert manifest["splits"][split]["per_class"] == {str(d): len(indices) for d in range(10)}
        assert manifest["splits"][split]["audio_count"] == len(expected)
        for r in records:
            digit = int(r["sample_id"].split("/")[1].split("_")[0])
            row = rows[r["sample_id"]]
            assert r["label"] == digit == labels[row]
            assert r["speaker"] == "theo"
            assert r["image"].shape == (28, 28, 1) and r["audio"].shape == (20, 20, 1)
            assert 0.0 <= r["image"].min() and r["image"].max() <= 1.0
            np.testing.assert_allclose(r["image"][..., 0], images[row].astype(np.float32) / 255.0, atol=1e-7)
            assert r["modality_mask"].tolist() == [1, 1]
            assert np.all(np.isfinite(r["audio"])) and np.abs(r["audio"]).max() > 1.0
            seen[r["sample_id"]] = r
    assert len(set(rows.values())) == len(rows) == 30          # train and test never share an image
    # The stored audio is the MFCC of the recording named by the sample id.
    wav, rate = avmnist.load_wav(FSDD / "7_theo_16.wav")
    np.testing.assert_allclose(seen["train/7_theo_16"]["audio"][..., 0], avmnist.mfcc(wav, rate).numpy(), atol=1e-4)


def test_train_shards_are_round_robin(small_build):
    import tensorflow as tf

    out, _ = small_build
    counts = [sum(1 for _ in tf.data.TFRecordDataset(str(f))) for f in avmnist.tfrecord_files(out, "train")]
    assert counts == [10, 10]


def test_audio_rate_drops_audio_for_half_of_each_training_class(tmp_path):
    manifest = avmnist.build_avmnist(MNIST, FSDD, tmp_path / "half", audio_rate=0.5,
                                     **dict(SMALL, train_indices=range(15, 19)))
    train, test = read_split(tmp_path / "half", "train"), read_split(tmp_path / "half", "test")
    assert len(train) == 40 and len(test) == 10
    for digit in range(10):
        masks = [r["modality_mask"].tolist() for r in train if r["label"] == digit]
        assert sorted(masks) == [[1, 0], [1, 0], [1, 1], [1, 1]]
    for r in train:
        assert r["image"].max() > 0
        assert (np.abs(r["audio"]).max() > 0) == bool(r["modality_mask"][1])
    assert all(r["modality_mask"].tolist() == [1, 1] and np.abs(r["audio"]).max() > 0 for r in test)
    assert manifest["splits"]["train"]["audio_per_class"] == {str(d): 2 for d in range(10)}
    assert manifest["splits"]["train"]["audio_count"] == 20 and manifest["splits"]["test"]["audio_count"] == 10
    # Different seeds drop different samples.
    other = avmnist.build_avmnist(MNIST, FSDD, tmp_path / "half1", audio_rate=0.5, seed=1,
                                  **dict(SMALL, train_indices=range(15, 19)))
    dropped = {r["sample_id"] for r in train if not r["modality_mask"][1]}
    dropped1 = {r["sample_id"] for r in read_split(tmp_path / "half1", "train") if not r["modality_mask"][1]}
    assert len(dropped) == len(dropped1) == 20 and dropped != dropped1
    assert other["audio_rate"] == 0.5


def test_build_is_deterministic_and_the_seed_changes_the_pairing(small_build, tmp_path):
    out, manifest = small_build
    avmnist.build_avmnist(MNIST, FSDD, tmp_path / "again", shards={"train": 2, "test": 1}, **SMALL)
    assert all_bytes(tmp_path / "again") == all_bytes(out)
    other = avmnist.build_avmnist(MNIST, FSDD, tmp_path / "seed1", seed=1, **SMALL)
    changed = [k for k in manifest["mnist_rows"] if manifest["mnist_rows"][k] != other["mnist_rows"][k]]
    assert len(changed) > 20
    assert other["splits"]["train"]["per_class"] == manifest["splits"]["train"]["per_class"]


def test_all_test_puts_every_recording_into_one_split(tmp_path):
    names = [f"{d}_theo_{i}" + ".wav" for d in (2, 5) for i in (5, 20, 49)]
    folder = fsdd_subset(tmp_path / "fsdd", names)
    manifest = avmnist.build_avmnist(MNIST, folder, tmp_path / "out", speakers=("theo",), all_test=True,
                                     progress=False)
    assert list(manifest["splits"]) == ["test"] and manifest["test_indices"] == [5, 20, 49]
    records = read_split(tmp_path / "out", "test")
    assert sorted(r["sample_id"] for r in records) == sorted(f"test/{n[:-4]}" for n in names)
    assert manifest["splits"]["test"]["per_class"]["2"] == 3 and manifest["splits"]["test"]["per_class"]["0"] == 0


# -- MFCC --------------------------------------------------------------------------------------------------------------
def test_mfcc_of_sine_waves():
    low, high = (avmnist.mfcc(tone(8000, freqs=(f,)).astype(np.float32), 8000).numpy() for f in (300.0, 1000.0))
    assert low.shape == high.shape == (20, 20)
    assert np.all(np.isfinite(low)) and np.all(np.isfinite(high))
    assert np.abs(low - high).max() > 1.0
    # Centred frames: 8000 samples -> 2667 after wave[::3] -> 1 + 2667 // 512 = 6 frames, then zero padding.
    assert np.all(np.abs(low[:, :6]).max(axis=0) > 0) and np.all(low[:, 6:] == 0)
    # A long clip is truncated to 20 frames.
    long = avmnist.mfcc(tone(8000, seconds=5.0).astype(np.float32), 8000).numpy()
    assert long.shape == (20, 20) and np.all(np.abs(long).max(axis=0) > 0)


def reference_mfcc(wave):
    """librosa's MFCC recipe in NumPy/SciPy (float64) with TF's mel filters: np.pad reflect centring, periodic Hann,
    |rfft|^2, power_to_db(top_db=80), orthonormal DCT-II; SMIL's wave[::3] and padding to 20 frames."""
    import tensorflow as tf
    from scipy.fft import dct

    y = np.pad(np.asarray(wave, np.float64)[::3], 1024, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(2048) / 2048)
    frames = np.stack([y[i * 512:i * 512 + 2048] * window for i in range(1 + (len(y) - 2048) // 512)])
    mel = (np.abs(np.fft.rfft(frames, axis=-1)) ** 2) @ tf.signal.linear_to_mel_weight_matrix(
        128, 1025, 8000, 0.0, 4000.0).numpy().astype(np.float64)
    db = 10 * np.log10(np.maximum(mel, 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    coeffs = dct(db, type=2, norm="ortho", axis=-1)[:, :20].T[:, :20]
    return np.pad(coeffs, [(0, 0), (0, 20 - coeffs.shape[1])])


def test_mfcc_matches_a_numpy_reference_of_the_recipe():
    t = np.arange(40000) / 8000
    half_silent = np.where(t < 2.5, 0.3 * np.sin(2 * np.pi * 400 * t), 0.0)   # exercises the 80 dB floor
    waves = [avmnist.load_wav(FSDD / "0_theo_5.wav")[0], avmnist.load_wav(FSDD / "9_jackson_30.wav")[0],
             half_silent.astype(np.float32)]
    for wave in waves:
        np.testing.assert_allclose(avmnist.mfcc(wave, 8000).numpy(), reference_mfcc(wave), atol=2e-3)


def test_mfcc_frame_count_of_real_clips_follows_librosa_centring():
    for name in ("0_theo_5.wav", "9_jackson_30.wav"):
        wav, rate = avmnist.load_wav(FSDD / name)
        assert rate == 8000 and wav.dtype == np.float32 and np.abs(wav).max() <= 1.0
        coeffs = avmnist.mfcc(wav, rate).numpy()
        frames = min(20, 1 + len(wav[::3]) // 512)
        assert np.all(np.abs(coeffs[:, :frames]).max(axis=0) > 0) and np.all(coeffs[:, frames:] == 0)


def test_mfcc_resamples_other_rates_with_tensorflow_io(tmp_path):
    pytest.importorskip("tensorflow_io")
    import tensorflow as tf

    at8 = write_wav(tmp_path / "tone8k.wav", tone(8000), 8000)
    at16 = write_wav(tmp_path / "tone16k.wav", tone(16000), 16000)
    (w8, r8), (w16, r16) = avmnist.load_wav(at8), avmnist.load_wav(at16)
    assert (r8, r16) == (8000, 16000) and len(w16) == 2 * len(w8)
    m8, m16 = avmnist.mfcc(w8, r8).numpy(), avmnist.mfcc(w16, r16).numpy()
    assert m16.shape == (20, 20)
    active = slice(0, 6)  # the frames the 1 s clip fills; the zero padding would inflate the correlation
    assert np.corrcoef(m8[:, active].ravel(), m16[:, active].ravel())[0, 1] > 0.9
    # Inside tf.data (graph mode, the rate a tensor) the same numbers come out.
    ds = tf.data.Dataset.from_tensor_slices([str(at8), str(at16)]).map(avmnist.wav_to_mfcc)
    g8, g16 = (x.numpy() for x in ds)
    np.testing.assert_allclose(g8, m8, atol=1e-3)
    np.testing.assert_allclose(g16, m16, atol=1e-2)


# -- errors and atomic output ------------------------------------------------------------------------------------------
def test_load_wav_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        avmnist.load_wav(tmp_path / "nope.wav")
    bad = tmp_path / "4_theo_20.wav"
    bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 3)
    with pytest.raises(ValueError, match="4_theo_20.wav") as info:
        avmnist.load_wav(bad)
    assert "\n" not in str(info.value) and "function_node" not in str(info.value)


def test_build_names_a_corrupt_wav_and_writes_nothing(tmp_path):
    folder = fsdd_subset(tmp_path / "fsdd", [f"{d}_theo_15.wav" for d in range(10) if d != 3])
    (folder / "3_theo_15.wav").write_bytes(b"not a wav at all")
    with pytest.raises(ValueError, match="3_theo_15.wav") as info:
        avmnist.build_avmnist(MNIST, folder, tmp_path / "out", speakers=("theo",), train_indices=range(15, 16),
                              test_indices=(), progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdd"]


def test_bad_inputs_give_one_line_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        avmnist.build_avmnist(MNIST, tmp_path / "missing", out, progress=False)
    with pytest.raises(FileNotFoundError, match="nobody"):
        avmnist.build_avmnist(MNIST, FSDD, out, speakers=("nobody",), progress=False)
    with pytest.raises(FileNotFoundError, match="train indices 100..101"):
        avmnist.build_avmnist(MNIST, FSDD, out, speakers=("theo",), train_indices=range(100, 102), progress=False)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.zeros(3))
    with pytest.raises(ValueError, match="'images'"):
        avmnist.build_avmnist(tmp_path / "wrong.npz", FSDD, out, **SMALL)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        avmnist.build_avmnist(tmp_path / "absent.npz", FSDD, out, **SMALL)
    with pytest.raises(ValueError, match="audio_rate"):
        avmnist.build_avmnist(MNIST, FSDD, out, audio_rate=0.0, **SMALL)
    with pytest.raises(ValueError, match="overlap"):
        avmnist.build_avmnist(MNIST, FSDD, out, **dict(SMALL, test_indices=range(16, 18)))
    assert not out.exists()


@pytest.mark.parametrize("stage", ["reading audio", "writing the manifest"])
def test_failure_midway_leaves_no_output_and_keeps_an_earlier_build(small_build, tmp_path, monkeypatch, stage):
    out, _ = small_build
    before = all_bytes(out)
    real_load, real_manifest, calls = avmnist.load_wav, avmnist.build._write_manifest, []

    def flaky_load(path):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real_load(path)

    def flaky_manifest(folder, manifest):
        calls.append(folder)
        assert len(list(Path(folder).glob("*.tfrecord"))) == 2          # the records are already written
        raise RuntimeError("disk on fire")

    if stage == "reading audio":
        monkeypatch.setattr(avmnist.plan, "load_wav", flaky_load)
    else:
        monkeypatch.setattr(avmnist.build, "_write_manifest", flaky_manifest)
    for target in (out, tmp_path / "fresh"):
        calls.clear()
        with pytest.raises(RuntimeError, match="disk on fire"):
            avmnist.build_avmnist(MNIST, FSDD, target, seed=3, **SMALL)
        assert len(calls) == (5 if stage == "reading audio" else 1)
    assert all_bytes(out) == before
    assert not (tmp_path / "fresh").exists() and list(tmp_path.iterdir()) == []
    assert [p.name for p in out.parent.iterdir()] == ["out"]            # no partial folder left beside it


def test_rebuild_replaces_an_earlier_build_but_not_a_foreign_folder(tmp_path):
    out = tmp_path / "out"
    avmnist.build_avmnist(MNIST, FSDD, out, shards=3, **dict(SMALL, train_indices=range(15, 16)))
    assert len(list(out.glob("train-*"))) == 3
    avmnist.build_avmnist(MNIST, FSDD, out, **dict(SMALL, train_indices=range(15, 16)))
    assert sorted(p.name for p in out.iterdir()) == [fileio.MARKER, "manifest.json", "test-00000-of-00001.tfrecord",
                                                     "train-00000-of-00001.tfrecord"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        avmnist.build_avmnist(MNIST, FSDD, foreign, **SMALL)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_a_manifest_alone_does_not_make_a_folder_ours(tmp_path):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "manifest.json").write_text('{"task": "avmnist"}')
    (user / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing") as info:
        avmnist.build_avmnist(MNIST, FSDD, user, **dict(SMALL, train_indices=range(15, 16), test_indices=()))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in user.iterdir()) == ["manifest.json", "src", "thesis.tex"]
    assert (user / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        avmnist.build_avmnist(MNIST, FSDD, tmp_path / "afile", **SMALL)


def test_legacy_build_is_replaced_and_dead_partials_are_cleaned(tmp_path):
    out = tmp_path / "out"
    one = dict(SMALL, train_indices=range(15, 16), test_indices=())
    avmnist.build_avmnist(MNIST, FSDD, out, **one)
    os.remove(out / fileio.MARKER)                                      # as built before markers existed
    litter = dead_partial(out)
    avmnist.build_avmnist(MNIST, FSDD, out, **one)
    assert fileio.read_marker(str(out))["kind"] == avmnist.KIND and not litter.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    os.remove(out / fileio.MARKER)
    (out / "notes.txt").write_text("mine")                             # not what a build leaves: refused
    with pytest.raises(FileExistsError, match="refusing"):
        avmnist.build_avmnist(MNIST, FSDD, out, **one)
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").is_file()


def test_missing_requested_recordings_are_named(tmp_path):
    names = [f"{d}_theo_{i}.wav" for d in range(10) for i in (15, 16) if (d, i) not in ((3, 15), (7, 16))]
    folder = fsdd_subset(tmp_path / "fsdd", names)
    with pytest.raises(FileNotFoundError, match="3_theo_15.wav, 7_theo_16.wav") as info:
        avmnist.build_avmnist(MNIST, folder, tmp_path / "out", speakers=("theo",), train_indices=range(15, 17),
                              test_indices=(), progress=False)
    assert "\n" not in str(info.value) and "2 of the 20" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_unreadable_mnist_npz_is_named_on_one_line(tmp_path):
    images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10
    np.save(tmp_path / "plain.npy", images)
    os.rename(tmp_path / "plain.npy", tmp_path / "renamed.npz")        # an .npy under an .npz name
    np.savez_compressed(tmp_path / "whole.npz", images=images, labels=labels)
    blob = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])          # a truncated download
    for name in ("renamed.npz", "cut.npz"):
        with pytest.raises(ValueError, match=name) as info:
            avmnist.load_mnist(tmp_path / name)
        assert "\n" not in str(info.value)
    assert avmnist.load_mnist(tmp_path / "whole.npz")[0].shape == (20, 28, 28)


@pytest.mark.parametrize("text", ["a:b", "20:15", "1,-2"])
def test_bad_recording_indices(text):
    with pytest.raises(ValueError, match="indices") as info:
        avmnist.parse_indices(text)
    assert "\n" not in str(info.value)


def test_command_line(tmp_path, capsys):
    args = ["--data-dir", str(DATA), "--speakers", "theo", "--train-indices", "15:16", "--test-indices", "5,6"]
    assert avmnist.main([str(tmp_path / "cli"), *args]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["test"]["count"]) == (10, 20)
    assert avmnist.main([str(tmp_path / "cli2"), "--data-dir", str(tmp_path / "none")]) == 2
    assert "git clone https://github.com/Jakobovski/free-spoken-digit-dataset" in capsys.readouterr().err


# -- other readers and the data location -------------------------------------------------------------------------------
def test_read_published_avmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        (tmp_path / "image").mkdir(exist_ok=True)
        (tmp_path / "audio").mkdir(exist_ok=True)
        np.save(tmp_path / "image" / f"{split}_data.npy", rng.integers(0, 256, (n, 784)).astype(np.float32))
        np.save(tmp_path / "audio" / f"{split}_data.npy", rng.integers(0, 256, (n, 112, 112)).astype(np.float32))
        np.save(tmp_path / f"{split}_labels.npy", np.arange(n) % 10)
    read = avmnist.read_published_avmnist(tmp_path)
    raw = avmnist.read_published_avmnist(tmp_path, normalize=False)
    assert read["train"]["image"].shape == (6, 28, 28) and read["test"]["audio"].shape == (4, 112, 112)
    assert read["train"]["label"].tolist() == [0, 1, 2, 3, 4, 5] and read["train"]["label"].dtype == np.int64
    np.testing.assert_allclose(read["test"]["image"] * 255.0, raw["test"]["image"], rtol=1e-6)
    assert raw["train"]["audio"].max() > 1.0 and read["train"]["audio"].max() <= 1.0
    (tmp_path / "test_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_labels.npy"):
        avmnist.read_published_avmnist(tmp_path)


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SHASPEC_DATA", str(tmp_path))
    assert avmnist.default_data_dir() == str(tmp_path)
    monkeypatch.setenv("SHASPEC_DATA", "gs://bucket/avmnist")                # a URI is taken as it is
    assert avmnist.default_data_dir() == "gs://bucket/avmnist"
    monkeypatch.delenv("SHASPEC_DATA")
    repo = Path(avmnist.__file__).resolve().parents[3]
    expected = repo.parent / "shared" / "data"
    assert avmnist.default_data_dir() == (str(expected) if expected.is_dir() else None)
    monkeypatch.setattr(avmnist.sources, "_repo_root", lambda: str(tmp_path / "repo"))
    assert avmnist.default_data_dir() is None
    with pytest.raises(FileNotFoundError) as info:
        avmnist.require_data_dir()
    message = str(info.value)
    assert "\n" not in message and "git clone https://github.com/Jakobovski/free-spoken-digit-dataset" in message
    assert "npz" in message and "labels" in message
