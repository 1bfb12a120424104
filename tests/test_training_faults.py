"""Fault injection: ``shaspec train`` killed with SIGKILL at random instants, during checkpoint writes among them, and
a damaged newest checkpoint; re-running the same command each time must end with exactly the weights and history of
an uninterrupted run, and leave no partial files behind."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import h5_arrays
from shaspec_tf import fileio

pytestmark = pytest.mark.tensorflow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _command(data, out):
    # eager steps: no graph tracing in every restarted process (what is computed is the same run)
    return [sys.executable, "-m", "shaspec_tf.cli", "train", "--task", "brats", "--data", data, "--out", str(out),
            "--preset", "tiny", "--steps", str(STEPS), "--checkpoint-every", "1", "--batch-size", "1",
            "--crop", "32,32,32", "--warmup-steps", "1", "--eager", "--deterministic"]


def _env(**faults):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHASPEC_FAULT_")}
    return dict(env, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO, **{k: str(v) for k, v in faults.items()})


def _run(data, out, **faults):
    return subprocess.run(_command(data, out), capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=_env(**faults))


def _steps(out):
    folder = out / "checkpoints"
    names = os.listdir(folder) if folder.is_dir() else []
    return sorted(int(n[5:14]) for n in names if n.startswith("ckpt-") and n.endswith(".npz"))


def _kill_at_random(data, out, rng, log):
    """Start the run, wait until it has written a new checkpoint, then SIGKILL it after a random delay (during a
    step, a checkpoint write or a history write, whatever it is doing then)."""
    before = max(_steps(out), default=0)
    delay = rng.uniform(0.0, 0.8)
    process = subprocess.Popen(_command(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=REPO, env=_env())
    deadline = time.time() + 240
    while process.poll() is None and max(_steps(out), default=0) <= before and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    log.append(f"random kill after {delay:.2f}s past step {before}: rc {process.returncode}, now {_steps(out)}")
    assert process.returncode in (0, -signal.SIGKILL), err[-2000:]


def _partials(folder):
    return [os.path.join(root, name) for root, dirs, files in os.walk(folder) for name in files + dirs
            if ".partial-" in name]


def test_sigkill_at_any_instant_then_the_same_command_ends_where_an_uninterrupted_run_does(brats_data, tmp_path):
    seed = int(os.environ.get("SHASPEC_FAULT_SEED") or random.SystemRandom().randrange(2 ** 32))
    rng, log = random.Random(seed), [f"SHASPEC_FAULT_SEED={seed}"]
    straight = _run(brats_data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    # killed half-way through writing its second checkpoint: the first is whole, the half-written one is aside
    first = _run(brats_data, out, SHASPEC_FAULT_KILL_DURING_CHECKPOINT=2)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert _steps(out) == [1] and len(_partials(out / "checkpoints")) == 1, os.listdir(out / "checkpoints")
    # killed at random instants after some progress
    _kill_at_random(brats_data, out, rng, log)
    _kill_at_random(brats_data, out, rng, log)
    # killed right after a checkpoint was renamed into place, before the older ones were pruned
    after = _run(brats_data, out, SHASPEC_FAULT_KILL_AFTER_CHECKPOINT=1)
    assert after.returncode in (0, -signal.SIGKILL), after.stderr[-2000:]
    log.append(f"kill after a checkpoint: rc {after.returncode}, now {_steps(out)}")
    # a flipped bit in the newest checkpoint: the run goes back to the one before, saying so
    damaged = None
    if fileio.read_marker(str(out))["state"] != "complete":
        damaged = out / "checkpoints" / f"ckpt-{max(_steps(out)):09d}.npz"
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 2] ^= 0x04
        damaged.write_bytes(bytes(raw))
    last = _run(brats_data, out)
    assert last.returncode == 0, "; ".join(log) + "\n" + last.stderr[-2000:]
    if damaged is not None:
        assert f"skipping a checkpoint: {damaged} is unreadable" in last.stderr, "; ".join(log) + last.stderr[-2000:]

    a, b = h5_arrays(tmp_path / "straight" / "model.weights.h5"), h5_arrays(out / "model.weights.h5")
    assert sorted(a) == sorted(b) and len(a) > 100
    differing = [k for k in a if not np.array_equal(a[k], b[k])]
    assert differing == [], "; ".join(log) + f": {len(differing)} arrays differ, e.g. {differing[:3]}"
    history = json.loads((out / "history.json").read_text())
    assert history == json.loads((tmp_path / "straight" / "history.json").read_text()), "; ".join(log)
    assert len(history["loss"]) == STEPS
    assert _steps(out) == [STEPS - 1, STEPS] and _partials(out) == [], "; ".join(log)
    assert fileio.read_marker(str(out))["state"] == "complete"
    print("; ".join(log))


def test_a_run_that_failed_before_its_first_checkpoint_takes_the_corrected_command(brats_data, tmp_path):
    """A crop the model cannot take fails in the first step, after the run folder was made; the corrected command
    must start afresh there (nothing of value is in it), while a run with a checkpoint still refuses other options."""
    from shaspec_tf.training.trainer import TrainConfig, train

    out = tmp_path / "run"

    def config(**kw):
        return TrainConfig(**{**dict(task="brats", data=brats_data, out=str(out), preset="tiny", steps=2,
                                     checkpoint_every=1, batch_size=1, run_eagerly=True), **kw})

    with pytest.raises(Exception, match="bottleneck"):
        train(config(crop_size=(16, 32, 32)))
    assert fileio.read_marker(str(out))["state"] == "running" and not _steps(out)
    result = train(config(crop_size=(32, 32, 32)))
    assert result["steps"] == 2 and _steps(out) and fileio.read_marker(str(out))["state"] == "complete"
    assert json.loads((out / "train_config.json").read_text())["crop_size"] == [32, 32, 32]
    with pytest.raises(ValueError, match="other options"):
        train(config(crop_size=(32, 32, 32), steps=3))
