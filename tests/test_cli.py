"""The ``shaspec`` command line."""
import json

import numpy as np
import pytest

from shaspec_tf.cli import main


def test_demo_trains_and_writes_its_results(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--steps", "3", "--warmup", "1", "--shape", "32,32,32", "--eager", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "task_loss" in printed and "flair+t1+t1ce+t2" in printed
    report = json.loads((out / "demo.json").read_text())
    assert len(report["losses"]["loss"]) == 1 and np.isfinite(report["losses"]["loss"][0])
    assert len(report["dice"]) == 15
    assert (out / "model.weights.h5").stat().st_size > 0
    config = json.loads((out / "model_config.json").read_text())
    assert config["preset"] == "tiny"


def test_info_prints_the_parameter_count(capsys):
    assert main(["info", "--preset", "avmnist-tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["config"]["modalities"] == ["image", "audio"]


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])
