"""The ``shaspec`` command line.

    shaspec demo [--preset tiny] [--steps 60]     build a model and train it briefly on toy volumes
    shaspec info [--preset paper]                 print a preset's configuration and parameter count
    shaspec prepare phantom --out DIR --cases N   synthetic BraTS-layout NIfTI cases (MNI152 anatomy)
    shaspec prepare brats --input DIR --output DIR [Beam options]   NIfTI cases -> TFRecords (Apache Beam)
    shaspec prepare avmnist --out DIR [--mnist NPZ --fsdd DIR]      AV-MNIST (SMIL protocol) -> TFRecords
    shaspec train --task brats|avmnist --data DIR --out DIR [--steps N | --epochs N]   train, resumable
    shaspec evaluate --model DIR [--model DIR ...] --data DIR --out DIR   every modality subset, reports + heat-map
    shaspec predict --model DIR --flair F [--t1 F] [--t1ce F] [--t2 F] --out seg.nii.gz [--overwrite]
    shaspec predict --server HOST:PORT --model-name NAME [--protocol grpc|rest] --flair F ... --out seg.nii.gz
    shaspec export --model DIR --out BASE --name NAME [--version V]   SavedModel for TF Serving in BASE/NAME/V
    shaspec serve --model-base BASE [--grpc-port 8500] [--rest-port 8501] [--host 127.0.0.1]
                  [--max-request-bytes 1GiB] [--read-timeout 30]   local TF-Serving-compatible server (loopback)
    shaspec --version | --verbose COMMAND ...    the package version | TensorFlow's, absl's and Beam's logs too

The files and folders of every command (``prepare``, ``train``, ``evaluate``, ``predict``, ``export``, ``serve``) may
be ``gs://`` URIs as well as local paths (:mod:`shaspec_tf.fileio`). Bad input is one line on stderr and exit status 2
(``SHASPEC_TRACEBACK=1`` shows the traceback as well); outputs that are not provably ours are refused (see the
README's "Safety and limits").

This module is the library's command line: every command above but ``serve``, which belongs to the serving app.
The installed ``shaspec`` program is composed outside the library (``shaspec_serving/cli.py``): it passes its own
:class:`Command` s (``serve``) to :func:`main`. ``python -m shaspec_tf.cli serve`` says so in one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Callable, Sequence

import shaspec_tf
from shaspec_tf import commands as cmd
from shaspec_tf import logs


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand that the program composed around the library adds to ``shaspec`` (the plugin seam: the library
    never imports the applications built on it; they hand it their commands, see ``shaspec_serving/cli.py``).

    ``add_arguments(parser)`` declares the subcommand's options on its ``argparse`` parser; ``run(args, extra)``
    runs it and returns the exit status. Its bad input (``OSError``, ``ValueError``) is one line on stderr and exit
    status 2, as for the library's own commands."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list], int]


# Commands of the applications built on the library, and where to find them when they were not added to main().
APP_COMMANDS = {"serve": "the serving app's command: run the installed 'shaspec' program or "
                         "python -m shaspec_serving.cli"}


def _app_command_missing(args, extra) -> int:
    raise ValueError(f"'{args.command}' is {APP_COMMANDS[args.command]} (python -m shaspec_tf.cli has the "
                     f"library's commands only)")


def build_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The ``shaspec`` parser: the library's commands, then ``commands`` (see :class:`Command`); an application
    command of :data:`APP_COMMANDS` that is not among them gets a stand-in that says where it lives."""
    parser = argparse.ArgumentParser(prog="shaspec", description="ShaSpec missing-modality learning (Keras 3 / TFX)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {shaspec_tf.__version__}")
    parser.add_argument("--verbose", action="store_true", default=logs.verbose_default(),
                        help="show TensorFlow's C++ log and the warnings of absl, Beam and Python, before or after "
                             f"the command (default: quiet; ${logs.VERBOSE_ENV}=1 sets it)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build a model and train it briefly on toy volumes, printing losses")
    demo.add_argument("--preset", default="tiny", help="segmenter preset (tiny, small, paper)")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--warmup", type=int, default=20, help="steps with every modality before random dropout")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--shape", default="32,64,64", help="crop size D,H,W (divisible by 16,32,32)")
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--eager", action="store_true",
                      help="run the training steps eagerly: no graph compilation, slower steps (debugging)")
    demo.set_defaults(func=cmd.demo)

    info = sub.add_parser("info", help="print a preset's configuration and parameter count")
    info.add_argument("--preset", default="paper", help="a model preset: tiny, small, paper, avmnist, avmnist-tiny")
    info.set_defaults(func=cmd.info)

    prepare = sub.add_parser("prepare", help="turn raw data into TFRecords with modality masks").add_subparsers(
        dest="dataset", required=True)
    phantom = prepare.add_parser("phantom", help="synthetic BraTS-layout NIfTI cases on the MNI152 anatomy")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--cases", type=int, required=True)
    phantom.add_argument("--shape", help="D,H,W (default: a small CPU size; 155,240,240 for full BraTS size)")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--drop-rate", type=float, default=0.0, help="probability of leaving out each sequence")
    phantom.set_defaults(func=cmd.prepare_phantom)

    brats = prepare.add_parser("brats", help="BraTS NIfTI cases -> sharded TFRecords (Apache Beam); unknown "
                                             "options go to Beam, e.g. --runner DataflowRunner --project P ...")
    brats.add_argument("--input", required=True, help="folder of BraTS 2018-2021 or 2023 case folders")
    brats.add_argument("--output", required=True)
    brats.add_argument("--eval-fraction", type=float, default=0.2)
    brats.add_argument("--shards", type=int, default=1, help="TFRecord shards per split")
    brats.add_argument("--workers", type=int, help="DirectRunner processes (default: CPU count)")
    brats.add_argument("--strict", action="store_true", help="write nothing (and fail) if any case is bad")
    brats.add_argument("--unlabelled", action="store_true", help="cases without segmentations are fine")
    brats.add_argument("--no-crop", action="store_true", help="keep whole volumes (no crop to the brain)")
    brats.add_argument("--max-voxels", type=int, help="largest volume a NIfTI header may declare (default: "
                                                      "$SHASPEC_MAX_VOXELS, else 512^3 = 134217728)")
    brats.set_defaults(func=cmd.prepare_brats, beam_passthrough=True)

    av = prepare.add_parser("avmnist", help="AV-MNIST by the SMIL protocol from MNIST digits + spoken digits")
    av.add_argument("--out", required=True)
    av.add_argument("--mnist", help="npz with images uint8 [N, 28, 28] and labels (default: from --data-dir)")
    av.add_argument("--fsdd", help="folder of FSDD recordings {digit}_{speaker}_{index}.wav")
    av.add_argument("--data-dir", help="folder with mnist8k.npz and fsdd/recordings (default: $SHASPEC_DATA, "
                                       "else ../shared/data)")
    av.add_argument("--speakers", default="jackson,nicolas,theo", help="comma-separated, or 'all'")
    av.add_argument("--train-indices", default="15:50", help="recording indices, START:STOP or a comma list")
    av.add_argument("--test-indices", default="5:15")
    av.add_argument("--all-test", action="store_true", help="turn every recording into one evaluation split")
    av.add_argument("--audio-rate", type=float, default=1.0, help="fraction of training samples keeping audio")
    av.add_argument("--seed", type=int, default=0)
    av.add_argument("--shards", type=int, default=1)
    av.set_defaults(func=cmd.prepare_avmnist)

    tr = sub.add_parser("train", help="train ShaSpec (or the baseline) on prepared TFRecords; re-running the same "
                                      "command resumes from the last checkpoint")
    from shaspec_tf.tasks import task_names

    tr.formatter_class = cmd.TrainHelp  # "{name}": the default, from TrainConfig or the task; unset options stay None
    tr.add_argument("--task", required=True, choices=task_names())
    tr.add_argument("--data", required=True, help="the output folder of 'shaspec prepare'")
    tr.add_argument("--out", required=True)
    tr.add_argument("--preset", help="model preset (default: {task_preset})")
    tr.add_argument("--variant", choices=("shaspec", "baseline", "concat"),
                    help="baseline: the shared encoder alone on zero-filled inputs; concat (classifiers): one "
                         "encoder per modality, features concatenated (default: {variant})")
    length = tr.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=int)
    tr.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default {checkpoint_every})")
    tr.add_argument("--batch-size", type=int, help="default: {task_batch_size}")
    tr.add_argument("--crop", help="training crop D,H,W (brats; default: the preset's)")
    tr.add_argument("--regime", choices=("non-dedicated", "dedicated"), help="default: {regime}")
    tr.add_argument("--subset", help="dedicated training: the available modalities, e.g. flair+t1ce")
    tr.add_argument("--warmup-steps", type=int, help="steps with every modality before dropout (default "
                                                     "{warmup_steps})")
    tr.add_argument("--ramp-steps", type=int, help="ramp the dropout rate from 0 over this many steps (default "
                                                   "{ramp_steps})")
    tr.add_argument("--drop-rate", type=float,
                    help="probability that a sample's modalities are dropped (default: {task_drop_rate})")
    tr.add_argument("--drop-probs", metavar="MODALITY=P,...",
                    help="independent dropout per modality instead of --drop-rate's law, e.g. audio=0.5,image=0.2 "
                         "(unnamed modalities: 0; a sample always keeps one)")
    tr.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                    help="a model option of the preset (repeatable; VALUE read as JSON when it parses, else as text), "
                         "e.g. remat=encoders, absent_features=encoded, fusion_kernel=1")
    tr.add_argument("--lr", type=float, help="default: {task_learning_rate}")
    tr.add_argument("--schedule", choices=("poly", "cosine", "constant"), help="default: {schedule}")
    tr.add_argument("--optimizer", choices=("sgd", "adam"), help="default: {task_optimizer}")
    tr.add_argument("--weight-decay", type=float, help="default: {task_weight_decay}")
    tr.add_argument("--mixed-precision", choices=("off", "bf16", "fp16"), help="default: {mixed_precision}")
    tr.add_argument("--xla", action="store_true", help="compile the train step with XLA (slow to compile on CPU)")
    tr.add_argument("--eager", action="store_true", help="run eagerly (debugging)")
    tr.add_argument("--strategy", choices=("default", "mirrored", "multi_worker"), help="default: {strategy}")
    tr.add_argument("--audio-rate", type=float, help="avmnist: keep audio for this fraction of training samples")
    tr.add_argument("--seed", type=int, help="default: {seed}")
    tr.add_argument("--deterministic", action="store_true",
                    help="deterministic TensorFlow ops: a resumed run is bit-identical to an uninterrupted one")
    tr.set_defaults(func=cmd.train)

    def inference_options(p):
        p.add_argument("--roi", help="sliding-window size D,H,W (default: the model's training crop)")
        p.add_argument("--overlap", type=float, default=1 / 3)
        p.add_argument("--tta", action="store_true", help="average over the 8 flips")
        p.add_argument("--postprocess", action="store_true", help="the official ShaSpec* post-processing")
        p.add_argument("--precision", help="the sliding window's compute precision: fp32 (default) or bf16 (the "
                                           "layers in bfloat16 with float32 weights, as autocast in nnU-Net and "
                                           "MONAI; for GPUs)")

    from shaspec_tf.tasks import all_tasks

    ev = sub.add_parser("evaluate", help="score trained models on every modality subset (metrics.json, CSV, "
                                         "Markdown, heat-map, segmentation overlays; HD95 as the official BraTS "
                                         "package computes it; several --model side by side)")
    ev.add_argument("--model", action="append", required=True,
                    help="a 'shaspec train' output folder or a .keras file (repeatable; paths may be gs:// URIs)")
    ev.add_argument("--data", required=True, help="a 'shaspec prepare' output folder")
    ev.add_argument("--out", required=True, help="the report folder (replaced only when it is an earlier report)")
    ev.add_argument("--split", help="default: the task's evaluation split (" + ", ".join(
        f"{t.eval_split} for {t.name}" for t in all_tasks()) + ")")
    inference_options(ev)
    ev.add_argument("--overlay-cases", type=int, default=3,
                    help="segmentation: draw the reference, full-set and worst subsets' labels over FLAIR for this "
                         "many cases (overlays/<case>.png; 0: none; default 3)")
    ev.set_defaults(func=cmd.evaluate)

    pr = sub.add_parser("predict", help="segment one case from any non-empty subset of its sequences, with a local "
                                        "model (--model) or a TF Serving server (--server)")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a 'shaspec train' output folder or a .keras file")
    source.add_argument("--server", help="HOST:PORT of TF Serving or 'shaspec serve' (gRPC 8500, REST 8501)")
    pr.add_argument("--model-name", help="with --server: the served model's name")
    pr.add_argument("--model-version", type=int, help="with --server: a version (default: the latest)")
    pr.add_argument("--protocol", default="grpc", choices=("grpc", "rest"), help="with --server")
    for modality in ("flair", "t1", "t1ce", "t2"):
        pr.add_argument(f"--{modality}", help=f"{modality.upper()} NIfTI file (a path or a gs:// URI)")
    pr.add_argument("--out", required=True, help="output NIfTI (BraTS labels 0, 1, 2, 4; the input's affine); an "
                                                 "existing file is replaced only when it is a label map of ours")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file whoever wrote it "
                                                               "(never an input)")
    inference_options(pr)
    pr.set_defaults(func=cmd.predict)

    ex = sub.add_parser("export", help="a trained model -> TF Serving SavedModel BASE/NAME/VERSION (signatures "
                                       "serving_default, and segment_volume for segmenters)")
    ex.add_argument("--model", required=True, help="a 'shaspec train' output folder or a .keras file")
    ex.add_argument("--out", required=True, help="the model base folder (TF Serving's --model_base_path parent; "
                                                 "a path or a gs:// URI)")
    ex.add_argument("--name", required=True, help="the model name (a folder under --out)")
    ex.add_argument("--version", type=int, help="default: one more than the highest existing version")
    ex.add_argument("--overlap", type=float, default=1 / 3, help="segment_volume's sliding-window overlap")
    ex.set_defaults(func=cmd.export)

    for command in commands:
        added = sub.add_parser(command.name, help=command.help)
        command.add_arguments(added)
        added.set_defaults(func=command.run)
    for name in sorted(set(APP_COMMANDS) - {command.name for command in commands}):
        stand_in = sub.add_parser(name, help=f"(not here: {APP_COMMANDS[name]})", add_help=False)
        stand_in.set_defaults(func=_app_command_missing, any_arguments=True)
    return parser


# TensorFlow errors that come from the user's files or data (a missing, unreadable or corrupt file, a tensor the
# graph's checks refuse, a request too large for the machine), not from a bug. Internal, Unknown, Unimplemented,
# Aborted and the rest stay tracebacks.
_TF_INPUT_ERRORS = ("NotFoundError", "AlreadyExistsError", "PermissionDeniedError", "DataLossError",
                    "InvalidArgumentError", "OutOfRangeError", "ResourceExhaustedError", "UnavailableError",
                    "FailedPreconditionError")
_TF_NOISE = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\](\s*name:.*)?$")


def _input_errors() -> tuple:
    """The exception types that mean bad input, printed as one line without a traceback.

    ``OSError`` (missing or unreadable files, our ``FileExistsError`` refusals, h5py's errors on garbage files) and
    ``ValueError`` (our checks, ``json.JSONDecodeError``, ``UnicodeDecodeError``), plus TensorFlow's
    :data:`_TF_INPUT_ERRORS` when the command imported TensorFlow. Everything else (``KeyError``, ``TypeError``,
    ``AttributeError``, TensorFlow's internal errors, ...) points at a bug and keeps its traceback: code that
    reads user files turns their errors into one-line ``ValueError``s naming the file."""
    types = [OSError, ValueError]
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    types += [getattr(errors, name) for name in _TF_INPUT_ERRORS if isinstance(getattr(errors, name, None), type)]
    return tuple(types)


def _error_line(error: BaseException) -> str:
    """The first meaningful line of ``error``'s message, plain (its type name when the message is empty).
    TensorFlow's messages lose their graph-trace lines and ``{{function_node ...}}`` / ``[Op:...]`` decorations."""
    text = getattr(error, "message", None) if type(error).__module__.startswith("tensorflow") else None
    text = str(error) if not isinstance(text, str) else text
    for line in text.splitlines():
        line = _TF_NOISE.sub("", line.strip()).strip()
        if not line or line.startswith(("Graph execution error", "Detected at node", "File ", "[[")):
            continue
        return line
    return type(error).__name__


def main(argv=None, commands: Sequence[Command] = ()) -> int:
    """Run ``shaspec`` with the library's commands plus ``commands`` (added by the program that composes it, see
    :class:`Command`); bad input (see :func:`_input_errors`) is one line on stderr and exit status 2. Set
    ``SHASPEC_TRACEBACK=1`` to get the full traceback instead. Logs are quiet unless ``--verbose``
    (:func:`shaspec_tf.logs.configure`, before any command imports TensorFlow)."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    # First of all, before anything (building the parser included) can import TensorFlow. The flag is global, so it
    # may also follow the command: 'shaspec train ... --verbose'.
    logs.configure(verbose="--verbose" in argv or logs.verbose_default())
    parser = build_parser(commands)
    args, extra = parser.parse_known_args(argv)
    extra = [arg for arg in extra if arg != "--verbose"]
    if extra and not (getattr(args, "beam_passthrough", False) or getattr(args, "any_arguments", False)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Compiled programs outlive the process (JAX's persistent cache, TensorFlow's for XLA-compiled functions), so a
    # second run does not compile again; before any command can compile. SHASPEC_COMPILE_CACHE=off turns it off.
    from shaspec_tf.compile_cache import enable_compile_cache

    enable_compile_cache()
    try:
        if args.func in (cmd.demo, cmd.info):
            return args.func(args)
        return args.func(args, extra)
    except Exception as error:  # noqa: BLE001  only the bad-input types below are caught; the rest is re-raised
        if not isinstance(error, _input_errors()) or os.environ.get("SHASPEC_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"shaspec {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
