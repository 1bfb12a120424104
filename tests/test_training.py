"""``shaspec train``: schedules, outputs, exact resume, checkpoints that survive damage, run folders that take only
their own run, one-line errors for bad options and bad records, strategies."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import shaspec_tf
from shaspec_tf import fileio
from shaspec_tf.data.schema import avmnist_example
from shaspec_tf.training import PolyDecay, make_optimizer, make_schedule
from shaspec_tf.training.trainer import TrainConfig, train

pytestmark = pytest.mark.tensorflow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def avmnist_data(tmp_path_factory):
    """24 synthetic AV-MNIST samples, a third without audio."""
    root = tmp_path_factory.mktemp("avmnist")
    rng = np.random.default_rng(1)
    with tf.io.TFRecordWriter(str(root / "train-00000-of-00001.tfrecord")) as writer:
        for i in range(24):
            writer.write(avmnist_example(f"s{i}", rng.random((28, 28)), rng.normal(size=(20, 20)),
                                         [1, int(i % 3 != 0)], i % 10, "x").SerializeToString())
    return str(root)


def brats_config(data, out, **kw):
    base = dict(task="brats", data=data, out=str(out), preset="tiny", steps=4, checkpoint_every=2, batch_size=1,
                crop_size=(32, 32, 32), run_eagerly=True, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


def test_poly_schedule_matches_the_official_formula():
    schedule = PolyDecay(1e-2, 100)
    for step in (0, 10, 50, 99, 100, 150):
        expected = 1e-2 * (1 - min(step, 100) / 100) ** 0.9
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert isinstance(make_schedule("cosine", 1e-2, 10), keras.optimizers.schedules.CosineDecay)
    sgd = make_optimizer("sgd", 1e-2)
    assert sgd.nesterov and sgd.momentum == pytest.approx(0.99)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("step", 1e-2, 10)


def test_training_writes_weights_history_curves_and_checkpoints(brats_data, tmp_path):
    result = train(brats_config(brats_data, tmp_path / "run"))
    out = tmp_path / "run"
    assert result["steps"] == 4 and result["resumed_from_step"] == 0
    for name in ("model.weights.h5", "model_config.json", "train_config.json", "history.json",
                 "learning_curves.png", "checkpoints/ckpt-000000002.npz", "checkpoints/ckpt-000000004.npz"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert {"task_loss", "alignment_loss", "domain_loss"} <= set(history)
    assert os.listdir(out / "tensorboard")
    marker = fileio.read_marker(str(out))
    assert marker["kind"] == "train-run" and marker["state"] == "complete" and marker["steps"] == 4
    assert marker["run"]["steps"] == 4 and marker["run"]["data"] == os.path.abspath(brats_data)
    assert "model.weights.h5" in marker["files"] and not _partials(out)
    # the same model as one .keras file, loadable without the folder's config
    restored = keras.saving.load_model(str(out / "model.keras"))
    reference = shaspec_tf.build_segmenter("tiny")
    reference.load_weights(str(out / "model.weights.h5"))
    x = {"image": np.random.default_rng(0).normal(size=(1, 32, 32, 32, 4)).astype("float32"),
         "modality_mask": np.array([[1, 0, 1, 1]], "float32")}
    np.testing.assert_allclose(keras.ops.convert_to_numpy(restored(x)["logits"]),
                               keras.ops.convert_to_numpy(reference(x)["logits"]), rtol=0, atol=1e-6)


def _partials(folder):
    """Partial files (``.NAME.partial-...``) anywhere under ``folder``."""
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder) for name in files + dirs
            if ".partial-" in name]


def _flip_byte(path, fraction=0.5):
    raw = bytearray(open(path, "rb").read())
    raw[int(len(raw) * fraction)] ^= 0x10
    open(path, "wb").write(bytes(raw))


def _interrupted(config, at_epoch, *callbacks):
    """Train with ``config`` until epoch ``at_epoch`` begins (its checkpoints written), then stop."""
    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == at_epoch:
                raise RuntimeError("simulated interruption")

    with pytest.raises(RuntimeError, match="simulated"):
        train(config, callbacks=[*callbacks, Stop()])


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(brats_data, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted(brats_config(brats_data, out, steps=4, checkpoint_every=1), at_epoch=2)
    ckpts = out / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["ckpt-000000001.npz", "ckpt-000000002.npz"]
    _flip_byte(ckpts / "ckpt-000000002.npz")
    capsys.readouterr()
    result = train(brats_config(brats_data, out, steps=4, checkpoint_every=1))
    notices = [line for line in capsys.readouterr().err.splitlines() if "skipping a checkpoint" in line]
    assert len(notices) == 1 and "ckpt-000000002.npz is unreadable (BadZipFile" in notices[0], notices
    assert notices[0].endswith("resuming from ckpt-000000001.npz")
    assert result["resumed_from_step"] == 1 and len(result["history"]["loss"]) == 4
    # the damaged one was rewritten by the resumed run; the newest two are kept
    assert sorted(os.listdir(ckpts)) == ["ckpt-000000003.npz", "ckpt-000000004.npz"]
    from shaspec_tf.training import checkpoint

    assert [checkpoint.read(str(ckpts / n))["meta"]["step"] for n in sorted(os.listdir(ckpts))] == [3, 4]
    # no usable checkpoint at all: a one-line error, and nothing is touched
    out = tmp_path / "lost"
    _interrupted(brats_config(brats_data, out, steps=2, checkpoint_every=1), at_epoch=1)
    path = out / "checkpoints" / "ckpt-000000001.npz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"^no usable checkpoint in .*ckpt-000000001\.npz is unreadable") as error:
        train(brats_config(brats_data, out, steps=2, checkpoint_every=1))
    assert "\n" not in str(error.value) and path.stat().st_size == 1000


def test_a_run_folder_takes_only_its_own_run(brats_data, tmp_path):
    out = tmp_path / "run"
    train(brats_config(brats_data, out, steps=2))
    saved = {name: (out / name).read_bytes() for name in ("train_config.json", "history.json", "model.weights.h5")}
    with pytest.raises(ValueError, match=r"other options \(seed 0 there, 1 here; steps 2 there, 4 here\)"):
        train(brats_config(brats_data, out, steps=4, seed=1))
    with pytest.raises(ValueError, match=r"other options \(model_options \{\} there, \{'missing_rule': 'first'\}"):
        train(brats_config(brats_data, out, steps=2, model_options={"missing_rule": "first"}))
    with pytest.raises(ValueError, match="other options .drop_rate 1.0 there, 0.5 here"):
        train(brats_config(brats_data, out, steps=2, drop_rate=0.5))
    # the same run again (how it runs is not what it computes): complete, nothing retrained or rewritten
    again = train(brats_config(brats_data, out, steps=2, run_eagerly=False))
    assert again["complete"] and again["steps"] == 2 and again["history"] == json.loads(saved["history.json"])
    assert {name: (out / name).read_bytes() for name in saved} == saved
    assert fileio.read_marker(str(out))["run"]["steps"] == 2
    # a folder that is not a run, and another tool's output, are refused untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "history.json").write_text("my notes")
    with pytest.raises(FileExistsError, match="is not empty and is not a shaspec training run"):
        train(brats_config(brats_data, mine, steps=2))
    assert os.listdir(mine) == ["history.json"] and (mine / "history.json").read_text() == "my notes"
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    fileio.write_marker(str(report), "evaluation-report")
    with pytest.raises(FileExistsError, match="'evaluation-report' output, not a training run"):
        train(brats_config(brats_data, report, steps=2))


def test_a_legacy_run_folder_resumes_from_its_old_checkpoint(brats_data, tmp_path, capsys):
    """A run folder of the previous layout (no marker; keras.callbacks.BackupAndRestore's checkpoint)."""
    out = tmp_path / "legacy"
    ckpts = out / "checkpoints"
    old_style = keras.callbacks.BackupAndRestore(str(ckpts), save_freq="epoch", delete_checkpoint=False)
    _interrupted(brats_config(brats_data, out, steps=4), 1, old_style)
    if (out / ".shaspec-output.json").exists():
        os.remove(out / ".shaspec-output.json")
    for name in os.listdir(ckpts):
        if name.endswith(".npz"):
            os.remove(ckpts / name)
    assert sorted(os.listdir(ckpts)) == ["latest.weights.h5", "training_metadata.json"]
    with pytest.raises(ValueError, match="other options .steps 4 there, 6 here"):
        train(brats_config(brats_data, out, steps=6))
    capsys.readouterr()
    result = train(brats_config(brats_data, out, steps=4))
    assert "resuming from an old-format checkpoint (latest.weights.h5, epoch 1" in capsys.readouterr().err
    assert result["resumed_from_step"] == 2 and len(result["history"]["loss"]) == 2
    assert fileio.read_marker(str(out))["state"] == "complete"
    assert sorted(os.listdir(ckpts)) == ["ckpt-000000004.npz"]


def test_bad_options_are_one_line_errors_before_anything_is_written(brats_data, tmp_path, capsys):
    out = tmp_path / "run"
    bad = [dict(steps=0), dict(steps=-2), dict(steps=True), dict(batch_size=0), dict(checkpoint_every=0),
           dict(checkpoint_every=-1), dict(warmup_steps=-1), dict(ramp_steps=-5), dict(drop_rate=1.5),
           dict(drop_rate=-0.1), dict(drop_rate=float("nan")), dict(audio_rate=1.01), dict(learning_rate=0.0),
           dict(learning_rate=float("inf")), dict(weight_decay=-1e-4), dict(crop_size=(32, 0, 32)),
           dict(crop_size=(32, 32)), dict(seed=-1), dict(seed=2 ** 32), dict(schedule="step"),
           dict(optimizer="rmsprop"), dict(mixed_precision="fp8"), dict(strategy="tpu"), dict(variant="other")]
    for options in bad:
        with pytest.raises(ValueError) as error:
            train(brats_config(brats_data, out, **options))
        assert "\n" not in str(error.value) and str(error.value), options
    assert not out.exists()
    TrainConfig(task="avmnist", data="d", out="o", steps=1, drop_rate=0, audio_rate=0.0).resolved()  # edges are fine
    from shaspec_tf.cli import main

    base = ["train", "--task", "brats", "--data", brats_data, "--out", str(out), "--preset", "tiny"]
    for extra, message in ((["--steps", "0"], "steps must be an integer >= 1, got 0"),
                           (["--steps", "2", "--batch-size", "0"], "batch size must be an integer >= 1, got 0"),
                           (["--steps", "2", "--checkpoint-every", "-3"], "checkpoint every must be an integer >= 1"),
                           (["--steps", "2", "--drop-rate", "2"], "drop rate must be a finite number in [0, 1]"),
                           (["--steps", "2", "--crop", "32,x,32"], "--crop must be three integers D,H,W")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"shaspec train: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def _record_spans(raw):
    """``[(start, end)]`` of each record of a TFRecord file: 8-byte length, 4-byte CRC, data, 4-byte CRC."""
    spans, at = [], 0
    while at < len(raw):
        length = int.from_bytes(raw[at:at + 8], "little")
        spans.append((at, at + 16 + length))
        at += 16 + length
    return spans


def test_empty_or_corrupt_records_are_one_line_errors_naming_the_file(brats_data, avmnist_data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "data-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match=r"the train split of .*empty has no records \(1 file"):
        train(brats_config(str(empty), tmp_path / "a"))
    (empty / "train-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="has no records"):
        train(TrainConfig(task="avmnist", data=str(empty), out=str(tmp_path / "b"), preset="avmnist-tiny", steps=2))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    raw = open(os.path.join(brats_data, "train", "data-00000-of-00001.tfrecord"), "rb").read()
    (_, _), (start, end), _ = _record_spans(raw)
    flipped = bytearray(raw)
    flipped[(start + end) // 2] ^= 0x01
    for name, content, good in (("flipped", bytes(flipped), 1), ("truncated", raw[:-40], 2)):
        path = tmp_path / name / "train" / "data-00000-of-00001.tfrecord"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        with pytest.raises(ValueError) as error:  # found mid-training (only the first record is read up front)
            train(brats_config(str(tmp_path / name), tmp_path / f"{name}-run"))
        assert str(error.value).startswith(f"{path}: corrupt TFRecord after {good} good records (DataLossError: ")
        assert "\n" not in str(error.value)
    av = open(os.path.join(avmnist_data, "train-00000-of-00001.tfrecord"), "rb").read()
    (tmp_path / "av").mkdir()
    (tmp_path / "av" / "train-00000-of-00001.tfrecord").write_bytes(av[:_record_spans(av)[5][1] + 20])
    with pytest.raises(ValueError, match=r"train-00000-of-00001.tfrecord: corrupt TFRecord after 6 good records"):
        train(TrainConfig(task="avmnist", data=str(tmp_path / "av"), out=str(tmp_path / "c"), preset="avmnist-tiny",
                          steps=2))
    assert not (tmp_path / "c").exists()


def test_final_weights_are_written_aside_and_dead_runs_partials_are_removed(brats_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = keras.Model.save_weights

    def disk_full(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half a weights file")
        raise OSError("No space left on device")

    monkeypatch.setattr(keras.Model, "save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(brats_config(brats_data, out, steps=2))
    monkeypatch.setattr(keras.Model, "save_weights", real_save)
    assert not (out / "model.weights.h5").exists() and not _partials(out)
    # what killed processes leave behind goes; a live process's partial file stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = fileio.host_name()
    litter = [out / f".history.json.partial-{host}-{dead.stdout.strip()}-deadbeef",
              out / f".model.weights.h5.partial-{host}-{dead.stdout.strip()}-deadbeef.weights.h5",
              out / "checkpoints" / f".ckpt-000000004.npz.partial-{host}-{dead.stdout.strip()}-deadbeef.npz"]
    for path in litter:
        path.write_bytes(b"partial")
    live = out / f".history.json.partial-{host}-{os.getpid()}-cafecafe"
    live.write_bytes(b"someone is writing this")
    result = train(brats_config(brats_data, out, steps=2))
    assert result["resumed_from_step"] == 2 and not result["complete"]  # re-finished from the last checkpoint
    assert _partials(out) == [str(live)]
    import shaspec_tf

    shaspec_tf.build_segmenter("tiny").load_weights(out / "model.weights.h5")


EXACT_RESUME = textwrap.dedent("""
    import json, sys
    import h5py, keras, numpy as np, tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    from shaspec_tf.training.trainer import TrainConfig, train

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated interruption")

    def arrays(path):
        out = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return out

    def checkpoint_arrays(folder):
        try:
            from shaspec_tf.training import checkpoint
        except ImportError:
            return {}
        arrays = checkpoint.read(checkpoint.list_checkpoints(folder)[0][1])
        arrays.pop("meta")
        return arrays

    from shaspec_tf.trained import evaluate_trained

    for name, options in json.loads(sys.argv[1]).items():
        root, subsets = options.pop("root"), options.pop("eval_subsets")
        straight = train(TrainConfig(out=root + "/straight", **options))
        try:
            train(TrainConfig(out=root + "/resumed", **options), callbacks=[Stop()])
        except RuntimeError:
            pass
        resumed = train(TrainConfig(out=root + "/resumed", **options))
        a, b = arrays(root + "/straight/model.weights.h5"), arrays(root + "/resumed/model.weights.h5")
        ca, cb = checkpoint_arrays(root + "/straight/checkpoints"), checkpoint_arrays(root + "/resumed/checkpoints")
        print("RESULT", json.dumps(dict(
            task=name, resumed_from=resumed["resumed_from_step"], arrays=len(a),
            differing=sorted(k for k in a if not np.array_equal(a[k], b[k])),
            checkpoint_arrays=len(ca), checkpoint_differing=sorted(k for k in ca if not np.array_equal(ca[k], cb[k])),
            same_history=straight["history"] == resumed["history"],
            scores=[json.dumps(evaluate_trained(root + "/" + run, options["data"], split="train", subsets=subsets,
                                                overlay_cases=0)["summary"], sort_keys=True)
                    for run in ("straight", "resumed")])), flush=True)
""")


def test_resume_is_bit_identical_to_an_uninterrupted_run_for_both_tasks(brats_data, avmnist_data, tmp_path):
    """Train N steps straight, and k steps, stop, resume to N: the same weights, optimiser and random states, bit
    for bit, and the same evaluation figures (so a seed gives the same numbers twice: the resumed run's first k
    steps are a second training from the same seed). AV-MNIST's head has a dropout layer whose random state must be part of the checkpoint. In a process
    with deterministic ops (what --deterministic sets up; oneDNN's float32 kernels stay on: they were reproducible
    in every run checked, and a 3D training step is 8 to 50 times slower without them)."""
    runs = {"brats": dict(vars(brats_config(brats_data, "unused", steps=4)), root=str(tmp_path / "brats"),
                          eval_subsets=["t1ce", "flair+t1+t1ce+t2"]),
            "avmnist": dict(task="avmnist", data=avmnist_data, preset="avmnist-tiny", steps=6, checkpoint_every=2,
                            batch_size=4, drop_rate=0.5, audio_rate=0.75, root=str(tmp_path / "avmnist"),
                            eval_subsets=None)}
    runs["brats"].pop("out")
    runs["brats"]["crop_size"] = list(runs["brats"]["crop_size"])
    done = subprocess.run([sys.executable, "-c", EXACT_RESUME, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["task"]: r for r in (json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    assert sorted(results) == ["avmnist", "brats"], done.stdout[-2000:]
    for task, result in sorted(results.items()):
        assert result["resumed_from"] == 2 and result["arrays"] > 50, result
        assert result["differing"] == [] and result["same_history"], result
        straight, resumed = result["scores"]
        assert straight == resumed and len(json.loads(straight)) == (3 if task == "brats" else 4), result
    for task, result in sorted(results.items()):  # the whole checkpoint: seed generator states included
        assert result["checkpoint_arrays"] > result["arrays"] // 2 and result["checkpoint_differing"] == [], result

def test_dedicated_regime_validates_the_subset(brats_data, tmp_path):
    with pytest.raises(ValueError, match="needs --subset"):
        train(brats_config(brats_data, tmp_path / "a", regime="dedicated"))
    with pytest.raises(ValueError, match="unknown modalities"):
        train(brats_config(brats_data, tmp_path / "b", regime="dedicated", subset="flair+dwi"))
    result = train(brats_config(brats_data, tmp_path / "c", regime="dedicated", subset="t1ce", steps=2))
    assert result["steps"] == 2


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="needs ../shared/data (MNIST + FSDD)")
def test_avmnist_training_and_a_mirrored_strategy_on_two_cpus(tmp_path):
    from shaspec_tf.data.avmnist import build_avmnist

    build_avmnist(os.path.join(SHARED, "mnist8k.npz"), os.path.join(SHARED, "fsdd", "recordings"),
                  tmp_path / "av", speakers=("theo",), train_indices=range(15, 18), test_indices=range(5, 6),
                  progress=False)
    result = train(TrainConfig(task="avmnist", data=str(tmp_path / "av"), out=str(tmp_path / "run"),
                               preset="avmnist-tiny", epochs=1, batch_size=10, run_eagerly=True, audio_rate=0.5))
    assert result["steps"] == 3 and np.isfinite(result["history"]["loss"][-1])
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from shaspec_tf.training.trainer import TrainConfig, train
        r = train(TrainConfig(task="avmnist", data={str(tmp_path / "av")!r}, out={str(tmp_path / "mirrored")!r},
                              preset="avmnist-tiny", steps=2, batch_size=10, strategy="mirrored"))
        print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync, "LOSS", r["history"]["loss"][-1])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("REPLICAS")][0].split()
    assert line[1] == "2" and np.isfinite(float(line[3]))


def test_task_defaults_follow_the_paper():
    brats = TrainConfig(task="brats", data="d", out="o", steps=1).resolved()
    avmnist = TrainConfig(task="avmnist", data="d", out="o", epochs=1).resolved()
    assert (brats.optimizer, brats.learning_rate, brats.drop_rate) == ("sgd", 1e-2, 1.0)
    assert (avmnist.optimizer, avmnist.learning_rate, avmnist.weight_decay, avmnist.drop_rate) == (
        "adam", 1e-3, 1e-2, 1.0)        # the official dropout law, chosen by the 5-seed study (README)
    assert TrainConfig(task="avmnist", data="d", out="o", epochs=1, drop_rate=0.5).resolved().drop_rate == 0.5
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        TrainConfig(task="brats", data="d", out="o").resolved()


def test_per_modality_drop_probabilities_are_checked_and_named():
    def resolved(probs):
        return TrainConfig(task="avmnist", data="d", out="o", epochs=1, drop_probs=probs).resolved().drop_probs

    assert resolved({"audio": 0.5}) == {"image": 0.0, "audio": 0.5}
    assert resolved([0.2, 0.3]) == {"image": 0.2, "audio": 0.3}
    for bad, message in (({"sound": 0.5}, "unknown modalities \\['sound'\\]"), ({"audio": 1.5}, "audio must be"),
                         ([0.1], "one per modality"), ({"image": True}, "image must be")):
        with pytest.raises(ValueError, match=message):
            resolved(bad)
    from shaspec_tf.training.runfolder import run_options
    plain = TrainConfig(task="avmnist", data="d", out="o", epochs=1).resolved()
    assert "drop_probs" not in run_options(plain)       # folders written before the option still resume
    assert run_options(TrainConfig(task="avmnist", data="d", out="o", epochs=1, drop_probs={"audio": 0.5})
                       .resolved())["drop_probs"] == {"image": 0.0, "audio": 0.5}


def test_mixed_precision_trains_and_restores_the_policy(brats_data, tmp_path):
    # In a process without oneDNN: its bf16 CPU kernels are not deterministic (TF 2.16; the same seeded 2-step run
    # gave a different loss most times, and NaN or a 1e21 loss about once in 12), while without them the loss was
    # identical in 17 runs out of 17. The oneDNN default stays as it is everywhere else.
    config = vars(brats_config(brats_data, tmp_path / "bf16", steps=2, mixed_precision="bf16"))
    script = textwrap.dedent(f"""
        import keras, numpy as np, shaspec_tf
        from shaspec_tf.training.trainer import TrainConfig, train
        before = keras.mixed_precision.global_policy().name
        result = train(TrainConfig(**{config!r}))
        model = shaspec_tf.build_segmenter("tiny")
        model.load_weights({str(tmp_path / "bf16" / "model.weights.h5")!r})  # float32 master weights
        print("LOSS", result["history"]["loss"][-1], "RESTORED", keras.mixed_precision.global_policy().name == before,
              "FLOAT32", all(v.dtype == "float32" for v in model.weights))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0"))
    assert done.returncode == 0, done.stderr[-2000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("LOSS")][0].split()
    assert np.isfinite(float(line[1])) and line[3] == "True" and line[5] == "True"
