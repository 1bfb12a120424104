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

Bad input is one line on stderr and exit status 2 (``SHASPEC_TRACEBACK=1`` shows the traceback as well); outputs
that are not provably ours are refused (see the README's "Safety and limits").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow's GCE cluster resolver imports google-api-core, which warns about Python 3.10 on every start.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.api_core")


DEMO_KIND = "demo-run"  # the fileio marker kind of a 'shaspec demo' output folder


def _demo(args) -> int:
    import keras
    import numpy as np

    import shaspec_tf
    from shaspec_tf import fileio
    from shaspec_tf.data.masks import all_subsets, random_modality_masks
    from shaspec_tf.data.toy import toy_batch
    from shaspec_tf.metrics import region_dice

    shape = tuple(int(v) for v in args.shape.split(","))
    fileio.ensure_replaceable(args.out, DEMO_KIND)  # a user's folder is refused before any training
    keras.utils.set_random_seed(args.seed)
    model = shaspec_tf.build_segmenter(args.preset)
    modalities = model.modalities
    print(f"shaspec demo: {model.name}, {model.count_params():,} parameters, backend {keras.backend.backend()}, "
          f"crops {shape}, batch {args.batch}, {args.steps} steps "
          f"({args.warmup} with every modality, then random modality dropout)")

    class ToyBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(args.seed)

        def __len__(self):
            return args.steps

        def __getitem__(self, index):
            images, regions = toy_batch(self.rng, args.batch, shape)
            drop = 0.0 if index < args.warmup else 1.0
            masks = random_modality_masks(self.rng, args.batch, len(modalities), drop_rate=drop)
            return {"image": images, "modality_mask": masks}, regions

    model.compile(optimizer=keras.optimizers.SGD(args.lr, momentum=0.99, nesterov=True), run_eagerly=args.eager)
    start = time.time()
    history = model.fit(ToyBatches(), epochs=1, verbose=1 if sys.stdout.isatty() else 2)
    seconds = time.time() - start
    losses = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    print(f"trained {args.steps} steps in {seconds:.0f} s: " +
          ", ".join(f"{k} {v[-1]:.4f}" for k, v in sorted(losses.items())))

    images, regions = toy_batch(np.random.default_rng(args.seed + 1), 2, shape)
    print("Dice on 2 held-out toy cases per available-modality subset (ET / WT / TC):")
    table = {}
    for name, mask in all_subsets(modalities):
        logits = model.predict_on_batch({"image": images, "modality_mask": np.tile(mask, (2, 1))})["logits"]
        table[name] = region_dice(logits, regions)
        print(f"  {name:<20} " + " / ".join(f"{table[name][r]:.3f}" for r in ("ET", "WT", "TC")))

    staging = fileio.staging_dir(args.out)  # built aside, then moved onto --out as one marked folder
    try:
        model.save_weights(os.path.join(staging, "model.weights.h5"))
        with open(os.path.join(staging, "model_config.json"), "w") as f:
            f.write(model.config_json())
        with open(os.path.join(staging, "demo.json"), "w") as f:
            json.dump({"losses": losses, "seconds": seconds, "dice": table}, f, indent=2)
        fileio.replace_dir(staging, args.out, DEMO_KIND)
    except BaseException:
        fileio.remove_tree(staging)
        raise
    print(f"weights, config and figures written to {os.path.abspath(args.out)}")
    return 0


def _info(args) -> int:
    import shaspec_tf

    build = shaspec_tf.build_classifier if args.preset.startswith("avmnist") else shaspec_tf.build_segmenter
    model = build(args.preset)
    print(json.dumps({"name": model.name, "parameters": model.count_params(), "config": model.shaspec_config},
                     indent=2, default=list))
    return 0


def _quiet_beam_logs() -> None:
    """Beam at WARNING, except our per-case progress lines, which multi-processing workers forward through the
    local job service wrapped in a proto dump: keep those, unwrapped. The log goes to stdout, beside the summary it
    leads to, so that stderr holds nothing but the one-line error of a failed run."""
    import logging
    import re

    # Beam's worker processes import TensorFlow afresh; keep google-api-core's Python-version notice out of them too.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("apache_beam", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    message = re.compile(r'message: "([^"]*)"')
    harmless = ("No semi_persistent_directory", "Discarding unparseable args")

    class CaseProgress(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            if "beam_brats.py" in text and message.search(text):
                record.msg, record.args, record.name = message.search(text).group(1), (), "shaspec.prepare"
                return True
            return record.levelno >= logging.WARNING and not any(h in text for h in harmless)

    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO)
    forwarded.addFilter(CaseProgress())


def _prepare_phantom(args, extra) -> int:
    from shaspec_tf.data.phantom import write_phantom_dataset

    try:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    except ValueError:
        raise ValueError(f"--shape must be three integers D,H,W, got {args.shape!r}") from None
    write_phantom_dataset(args.out, args.cases, shape=shape, seed=args.seed, drop_rate=args.drop_rate)
    print(f"wrote {args.cases} phantom cases to {os.path.abspath(args.out)} (details: phantoms.json)")
    return 0


def _prepare_brats(args, extra) -> int:
    from shaspec_tf.data.beam_brats import RejectedCasesError, prepare_brats

    _quiet_beam_logs()
    try:
        manifest = prepare_brats(args.input, args.output, eval_fraction=args.eval_fraction, shards=args.shards,
                                 require_label=not args.unlabelled, strict=args.strict,
                                 crop_to_brain=not args.no_crop, beam_args=extra, workers=args.workers,
                                 max_voxels=args.max_voxels)
    except RejectedCasesError as error:  # the reasons on stdout; the error itself is main's one line on stderr
        print("".join(f"  rejected {r['case_id']}: {r['reason']}\n" for r in error.rejected), end="")
        raise
    splits = ", ".join(f"{name} {info['cases']}" for name, info in manifest["splits"].items())
    print(f"wrote {manifest['written']} of {manifest['discovered']} cases ({splits}) to "
          f"{os.path.abspath(args.output)} in {manifest['seconds']:.1f} s; rejected {len(manifest['rejected'])}"
          + "".join(f"\n  rejected {r['case_id']}: {r['reason']}" for r in manifest["rejected"]))
    return 0


def _prepare_avmnist(args, extra) -> int:
    from shaspec_tf.data.avmnist import build_avmnist, parse_indices, sources_and_speakers

    mnist, fsdd, speakers = sources_and_speakers(args.data_dir, args.mnist, args.fsdd, args.speakers)
    manifest = build_avmnist(mnist, fsdd, args.out, speakers=speakers,
                             train_indices=parse_indices(args.train_indices),
                             test_indices=parse_indices(args.test_indices), all_test=args.all_test,
                             audio_rate=args.audio_rate, seed=args.seed, shards=args.shards)
    counts = ", ".join(f"{k} {v['count']} ({v['audio_count']} with audio)" for k, v in manifest["splits"].items())
    print(f"wrote {os.path.abspath(args.out)}: {counts}")
    return 0


def _train(args, extra) -> int:
    from shaspec_tf.training.trainer import TrainConfig, train

    crop = None
    if args.crop:
        try:
            crop = tuple(int(v) for v in args.crop.split(","))
        except ValueError:
            raise ValueError(f"--crop must be three integers D,H,W, got {args.crop!r}") from None
    config = TrainConfig(
        task=args.task, data=args.data, out=args.out, preset=args.preset, variant=args.variant, steps=args.steps,
        epochs=args.epochs, checkpoint_every=args.checkpoint_every, batch_size=args.batch_size,
        crop_size=crop, regime=args.regime,
        subset=args.subset, warmup_steps=args.warmup_steps, ramp_steps=args.ramp_steps, drop_rate=args.drop_rate,
        learning_rate=args.lr, schedule=args.schedule, optimizer=args.optimizer, weight_decay=args.weight_decay,
        mixed_precision=args.mixed_precision, jit_compile=args.xla, run_eagerly=args.eager, strategy=args.strategy,
        audio_rate=args.audio_rate, seed=args.seed, deterministic=args.deterministic)
    result = train(config)
    last = {k: v[-1] for k, v in result["history"].items() if v}
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
    if result.get("complete"):
        print(f"already trained to step {result['steps']}: {losses}; outputs in {os.path.abspath(args.out)}")
        return 0
    print(f"trained to step {result['steps']} (resumed from {result['resumed_from_step']}): "
          + losses + f"; outputs in {os.path.abspath(args.out)}")
    return 0


def _evaluate(args, extra) -> int:
    from shaspec_tf.evaluation import check_report_folder, write_report_folder
    from shaspec_tf.workflows import evaluate_trained

    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
    names = [os.path.basename(os.path.abspath(model_dir)) for model_dir in args.model]
    if len(set(names)) < len(names):
        raise ValueError(f"--model folders must have different names (each gets a report subfolder), got "
                         f"{', '.join(names)}")
    check_report_folder(args.out)  # --out is refused before any evaluation unless it is an earlier report of ours
    results = {}
    for name, model_dir in zip(names, args.model):
        results[name] = evaluate_trained(model_dir, args.data, split=args.split, roi_size=roi, overlap=args.overlap,
                                         tta=args.tta, postprocess=args.postprocess)
    write_report_folder(results, args.out, titles={name: f"{name} on {args.data}" for name in names},
                        comparison_title=f"Models on {args.data}")
    for name in names:
        out = args.out if len(names) == 1 else os.path.join(args.out, name)
        mean = results[name]["summary"]["mean"]
        print(f"{name}: mean over subsets " + ", ".join(
            f"{k} {v['dice'] * 100:.2f}" if isinstance(v, dict) else f"{k} {v * 100:.2f}" for k, v in mean.items())
            + f"; reports in {os.path.abspath(out)}")
    if len(names) > 1:
        print(f"side-by-side comparison in {os.path.abspath(args.out)}/comparison.md")
    return 0


def _predict(args, extra) -> int:
    paths = {"flair": args.flair, "t1": args.t1, "t1ce": args.t1ce, "t2": args.t2}
    if args.server:
        if args.model_name is None:
            raise ValueError("--server needs --model-name (the served model's name)")
        if args.roi or args.tta or abs(args.overlap - 1 / 3) > 1e-9:
            raise ValueError("--roi, --overlap and --tta are fixed in the exported graph; leave them out with --server")
        predict_nifti_remote = _serving_import("client").predict_nifti_remote
        result = predict_nifti_remote(args.server, args.model_name, paths, args.out, protocol=args.protocol,
                                      version=args.model_version, postprocess=args.postprocess,
                                      overwrite=args.overwrite)
    else:
        if args.model_name is not None or args.model_version is not None:
            raise ValueError("--model-name and --model-version go with --server, not --model")
        from shaspec_tf.workflows import predict_nifti

        roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
        result = predict_nifti(args.model, paths, args.out, roi_size=roi, overlap=args.overlap, tta=args.tta,
                               postprocess=args.postprocess, overwrite=args.overwrite)
    print(f"segmented from {'+'.join(result['modalities'])}: label voxels {result['label_voxels']} -> "
          f"{os.path.abspath(result['out'])}")
    return 0


def _serving_import(module: str):
    """``serving.<module>`` (the repository's serving package), with a one-line error when its extras are missing."""
    import importlib

    try:
        return importlib.import_module(f"serving.{module}")
    except ImportError as error:
        raise OSError(f"serving needs the 'serving' extras (pip install -e .[serving]): {error}") from error


def _export(args, extra) -> int:
    from shaspec_tf.export import export_trained

    path = export_trained(args.model, args.out, args.name, args.version, overlap=args.overlap)
    print(f"exported {os.path.abspath(args.model)} -> {os.path.abspath(path)}")
    return 0


def _serve(args, extra) -> int:
    import logging

    serve = _serving_import("server").serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    limits = {key: value for key, value in (("max_request_bytes", args.max_request_bytes),
                                            ("read_timeout_s", args.read_timeout)) if value is not None}
    return serve(args.model_base, args.grpc_port, args.rest_port, args.host, args.poll_seconds, **limits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shaspec", description="ShaSpec missing-modality learning (Keras 3 / TFX)")
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
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="print a preset's configuration and parameter count")
    info.add_argument("--preset", default="paper", help="tiny, small, paper, avmnist, avmnist-tiny")
    info.set_defaults(func=_info)

    prepare = sub.add_parser("prepare", help="turn raw data into TFRecords with modality masks").add_subparsers(
        dest="dataset", required=True)
    phantom = prepare.add_parser("phantom", help="synthetic BraTS-layout NIfTI cases on the MNI152 anatomy")
    phantom.add_argument("--out", required=True)
    phantom.add_argument("--cases", type=int, required=True)
    phantom.add_argument("--shape", help="D,H,W (default: a small CPU size; 155,240,240 for full BraTS size)")
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--drop-rate", type=float, default=0.0, help="probability of leaving out each sequence")
    phantom.set_defaults(func=_prepare_phantom)

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
    brats.set_defaults(func=_prepare_brats, beam_passthrough=True)

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
    av.set_defaults(func=_prepare_avmnist)

    tr = sub.add_parser("train", help="train ShaSpec (or the baseline) on prepared TFRecords; re-running the same "
                                      "command resumes from the last checkpoint")
    tr.add_argument("--task", required=True, choices=("brats", "avmnist"))
    tr.add_argument("--data", required=True, help="the output folder of 'shaspec prepare'")
    tr.add_argument("--out", required=True)
    tr.add_argument("--preset", help="model preset (default: small for brats, avmnist for avmnist)")
    tr.add_argument("--variant", default="shaspec", choices=("shaspec", "baseline"))
    length = tr.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=int)
    tr.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--crop", help="training crop D,H,W (brats; default: the preset's)")
    tr.add_argument("--regime", default="non-dedicated", choices=("non-dedicated", "dedicated"))
    tr.add_argument("--subset", help="dedicated training: the available modalities, e.g. flair+t1ce")
    tr.add_argument("--warmup-steps", type=int, default=0, help="steps with every modality before dropout")
    tr.add_argument("--ramp-steps", type=int, default=0, help="ramp the dropout rate from 0 over this many steps")
    tr.add_argument("--drop-rate", type=float,
                    help="probability that a sample's modalities are dropped (default: 1 for brats, 0 for avmnist)")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--schedule", default="poly", choices=("poly", "cosine", "constant"))
    tr.add_argument("--optimizer", choices=("sgd", "adam"))
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--mixed-precision", default="off", choices=("off", "bf16", "fp16"))
    tr.add_argument("--xla", action="store_true", help="compile the train step with XLA (slow to compile on CPU)")
    tr.add_argument("--eager", action="store_true", help="run eagerly (debugging)")
    tr.add_argument("--strategy", default="default", choices=("default", "mirrored", "multi_worker"))
    tr.add_argument("--audio-rate", type=float, help="avmnist: keep audio for this fraction of training samples")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--deterministic", action="store_true",
                    help="deterministic TensorFlow ops: a resumed run is bit-identical to an uninterrupted one")
    tr.set_defaults(func=_train)

    def inference_options(p):
        p.add_argument("--roi", help="sliding-window size D,H,W (default: the model's training crop)")
        p.add_argument("--overlap", type=float, default=1 / 3)
        p.add_argument("--tta", action="store_true", help="average over the 8 flips")
        p.add_argument("--postprocess", action="store_true", help="the official ShaSpec* post-processing")

    ev = sub.add_parser("evaluate", help="score trained models on every modality subset (metrics.json, CSV, "
                                         "Markdown, heat-map; several --model side by side)")
    ev.add_argument("--model", action="append", required=True, help="a 'shaspec train' output folder (repeatable)")
    ev.add_argument("--data", required=True, help="a 'shaspec prepare' output folder")
    ev.add_argument("--out", required=True)
    ev.add_argument("--split", help="default: eval (brats), test (avmnist)")
    inference_options(ev)
    ev.set_defaults(func=_evaluate)

    pr = sub.add_parser("predict", help="segment one case from any non-empty subset of its sequences, with a local "
                                        "model (--model) or a TF Serving server (--server)")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a 'shaspec train' output folder")
    source.add_argument("--server", help="HOST:PORT of TF Serving or 'shaspec serve' (gRPC 8500, REST 8501)")
    pr.add_argument("--model-name", help="with --server: the served model's name")
    pr.add_argument("--model-version", type=int, help="with --server: a version (default: the latest)")
    pr.add_argument("--protocol", default="grpc", choices=("grpc", "rest"), help="with --server")
    for modality in ("flair", "t1", "t1ce", "t2"):
        pr.add_argument(f"--{modality}", help=f"{modality.upper()} NIfTI file")
    pr.add_argument("--out", required=True, help="output NIfTI (BraTS labels 0, 1, 2, 4; the input's affine); an "
                                                 "existing file is replaced only when it is a label map of ours")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file whoever wrote it "
                                                               "(never an input)")
    inference_options(pr)
    pr.set_defaults(func=_predict)

    ex = sub.add_parser("export", help="a trained model -> TF Serving SavedModel BASE/NAME/VERSION (signatures "
                                       "serving_default, and segment_volume for segmenters)")
    ex.add_argument("--model", required=True, help="a 'shaspec train' output folder")
    ex.add_argument("--out", required=True, help="the model base folder (TF Serving's --model_base_path parent)")
    ex.add_argument("--name", required=True, help="the model name (a folder under --out)")
    ex.add_argument("--version", type=int, help="default: one more than the highest existing version")
    ex.add_argument("--overlap", type=float, default=1 / 3, help="segment_volume's sliding-window overlap")
    ex.set_defaults(func=_export)

    sv = sub.add_parser("serve", help="serve every model under a base folder over gRPC and REST with plain "
                                      "TensorFlow (TF Serving's APIs; new versions are picked up)")
    sv.add_argument("--model-base", required=True, help="folder of NAME/VERSION SavedModels")
    sv.add_argument("--grpc-port", type=int, default=8500)
    sv.add_argument("--rest-port", type=int, default=8501)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; another address exposes the "
                         "server, which has no authentication and no TLS, and logs a warning)")
    sv.add_argument("--poll-seconds", type=float, default=2.0, help="how often to look for new versions")
    sv.add_argument("--max-request-bytes", help="largest request, in bytes or with K/M/G (binary) units, e.g. "
                                                "512MiB (default 1GiB): gRPC message, REST body, decoded inputs")
    sv.add_argument("--read-timeout", type=float, help="seconds a REST client may send nothing before it is "
                                                       "dropped (default 30)")
    sv.set_defaults(func=_serve)
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


def main(argv=None) -> int:
    """Run ``shaspec``; bad input (see :func:`_input_errors`) is one line on stderr and exit status 2. Set
    ``SHASPEC_TRACEBACK=1`` to get the full traceback instead."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.func in (_demo, _info):
            return args.func(args)
        return args.func(args, extra)
    except Exception as error:  # noqa: BLE001  only the bad-input types below are caught; the rest is re-raised
        if not isinstance(error, _input_errors()) or os.environ.get("SHASPEC_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"shaspec {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
