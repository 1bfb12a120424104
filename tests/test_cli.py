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
    # One folder of ours, built aside and moved into place: marked, nothing else beside it.
    marker = json.loads((out / ".shaspec-output.json").read_text())
    assert marker["kind"] == "demo-run" and sorted(marker["files"]) == ["demo.json", "model.weights.h5",
                                                                       "model_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_info_prints_the_parameter_count(capsys):
    assert main(["info", "--preset", "avmnist-tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["config"]["modalities"] == ["image", "audio"]


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_errors_print_the_plain_first_line(monkeypatch, capsys):
    from shaspec_tf import commands

    def fails_with(error):
        def command(args):
            raise error
        monkeypatch.setattr(commands, "info", command)

    fails_with(ValueError("bad/empty: no records\nsecond line"))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "shaspec info: error: bad/empty: no records\n"  # no quotes, one line
    fails_with(FileNotFoundError())
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "shaspec info: error: FileNotFoundError\n"  # the type only when no message


def test_tensorflow_input_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import tensorflow as tf

    from shaspec_tf import commands

    def fails_with(error):
        def command(args):
            raise error
        monkeypatch.setattr(commands, "info", command)

    for error, line in (
            (tf.errors.DataLossError(None, None, "{{function_node __wrapped__IteratorGetNext_device_/job:localhost}} "
                                                 "corrupted record at 128 [Op:IteratorGetNext] name: "),
             "corrupted record at 128"),
            (tf.errors.InvalidArgumentError(None, None, "Graph execution error:\n\nDetected at node a/Assert "
                                                        "defined at (most recent call last):\n  File \"x.py\", line 1"
                                                        "\n\nassertion failed: [modality_mask is all zero]\n\t "
                                                        "[[{{node a/Assert}}]] [Op:__inference_f_1]"),
             "assertion failed: [modality_mask is all zero]"),
            (tf.errors.NotFoundError(None, None, "/no/such/file; No such file or directory"),
             "/no/such/file; No such file or directory")):
        fails_with(error)
        assert main(["info"]) == 2
        assert capsys.readouterr().err == f"shaspec info: error: {line}\n"
    # Programming errors are not bad input: they keep their traceback.
    for error in (KeyError("preset"), TypeError("unsupported operand"), tf.errors.InternalError(None, None, "bug")):
        fails_with(error)
        with pytest.raises(type(error)):
            main(["info"])
    # SHASPEC_TRACEBACK=1 shows the traceback of bad input too.
    fails_with(ValueError("bad input"))
    monkeypatch.setenv("SHASPEC_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad input"):
        main(["info"])


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.weights.h5").write_bytes(b"my own weights")
    (out / "notes.txt").write_text("thesis notes")
    args = ["demo", "--steps", "3", "--warmup", "1", "--shape", "32,32,32", "--eager", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by shaspec" in err[0]
    assert "task_loss" not in capsys.readouterr().out  # refused before any training
    assert sorted(p.name for p in out.iterdir()) == ["model.weights.h5", "notes.txt"]
    assert (out / "model.weights.h5").read_bytes() == b"my own weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left


def test_version_prints_the_package_version(capsys):
    import importlib.metadata

    import shaspec_tf

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"shaspec {shaspec_tf.__version__}\n"
    # One source: setup.py reads shaspec_tf.__version__, so the installed distribution says the same.
    assert importlib.metadata.version("shaspec-tf") == shaspec_tf.__version__


def test_the_installed_shaspec_command_has_every_command_and_its_version():
    import os
    import subprocess
    import sys

    import shaspec_tf

    script = os.path.join(os.path.dirname(sys.executable), "shaspec")
    if not os.path.exists(script):
        pytest.skip("the console script is not installed (pip install -e .)")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"shaspec {shaspec_tf.__version__}\n", "")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    listed = done.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert listed == ["demo", "info", "prepare", "train", "evaluate", "predict", "export", "serve"]


def test_verbose_is_a_global_flag_before_or_after_the_command(monkeypatch, capsys):
    from shaspec_tf import cli, logs

    calls = []
    monkeypatch.setattr(logs, "configure", lambda verbose=False: calls.append(verbose))
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    for argv, verbose in ((["info", "--preset", "avmnist-tiny"], False),
                          (["--verbose", "info", "--preset", "avmnist-tiny"], True),
                          (["info", "--preset", "avmnist-tiny", "--verbose"], True)):
        calls.clear()
        assert main(argv) == 0
        assert calls == [verbose], argv
        assert json.loads(capsys.readouterr().out)["parameters"] > 0
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    calls.clear()
    assert main(["info", "--preset", "avmnist-tiny"]) == 0 and calls == [True]
    assert cli.build_parser().parse_args(["info"]).verbose is True


def test_programs_add_commands_through_the_plugin_seam(capsys):
    from shaspec_tf.cli import Command

    def add_arguments(parser):
        parser.add_argument("--name", required=True)

    def run(args, extra):
        if args.name == "bad":
            raise ValueError("no such name\nsecond line")
        print(f"hello {args.name}")
        return 0

    hello = Command("hello", help="say hello", add_arguments=add_arguments, run=run)
    assert main(["hello", "--name", "you"], commands=[hello]) == 0
    assert capsys.readouterr().out == "hello you\n"
    assert main(["hello", "--name", "bad"], commands=[hello]) == 2  # bad input: one line, as for every command
    assert capsys.readouterr().err == "shaspec hello: error: no such name\n"
    with pytest.raises(SystemExit):
        main(["hello"])  # not a library command
    with pytest.raises(SystemExit):
        main(["hello", "--name", "you", "--stray"], commands=[hello])


def test_the_library_cli_points_app_commands_to_their_app(capsys):
    for argv in (["serve", "--model-base", "models"], ["serve", "--help"], ["serve"]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert captured.err.startswith("shaspec serve: error: 'serve' is the serving app's command: run the "
                                       "installed 'shaspec' program or python -m shaspec_serving.cli")


def test_train_drop_probs_option_is_checked_before_anything_is_written(tmp_path, capsys):
    for value, message in (("audio=lots", "--drop-probs takes MODALITY=P pairs"),
                           ("sound=0.5", "unknown modalities ['sound']")):
        out = tmp_path / "run"
        assert main(["train", "--task", "avmnist", "--data", str(tmp_path), "--out", str(out), "--epochs", "1",
                     "--drop-probs", value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()
