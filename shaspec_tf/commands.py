"""The bodies of the ``shaspec`` commands (the parser, the plug-in seam and the error handling are in
:mod:`shaspec_tf.cli`): each takes the parsed arguments (and the unparsed ones Beam may take) and returns the exit
status; bad input raises, and :func:`shaspec_tf.cli.main` turns it into one line."""
from __future__ import annotations

import argparse
import json
import sys
import time

from shaspec_tf import fileio, logs

DEMO_KIND = "demo-run"  # the fileio marker kind of a 'shaspec demo' output folder


def demo(args) -> int:
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
        with fileio.atomic_path(fileio.join(staging, "model.weights.h5"), ".weights.h5") as tmp:
            model.save_weights(tmp)
        fileio.atomic_write(fileio.join(staging, "model_config.json"), model.config_json())
        fileio.atomic_write_json(fileio.join(staging, "demo.json"), {"losses": losses, "seconds": seconds,
                                                                      "dice": table})
        fileio.replace_dir(staging, args.out, DEMO_KIND)
    except BaseException:
        fileio.remove_tree(staging)
        raise
    print(f"weights, config and figures written to {fileio.absolute(args.out)}")
    return 0


def info(args) -> int:
    from shaspec_tf.tasks import task_for_preset

    model = task_for_preset(args.preset).build_model(args.preset)
    print(json.dumps({"name": model.name, "parameters": model.count_params(), "config": model.shaspec_config},
                     indent=2, default=list))
    return 0


def quiet_beam_logs() -> None:
    """Beam at WARNING, except our per-case progress lines, which multi-processing workers forward through the
    local job service wrapped in a proto dump: keep those, unwrapped. The log goes to stdout, beside the summary it
    leads to, so that stderr holds nothing but the one-line error of a failed run. ``--verbose`` keeps the workers'
    harmless warnings too."""
    import logging
    import re

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for name in ("apache_beam", "absl", "distributed"):  # distributed: Beam's Dask runner's cluster
        logging.getLogger(name).setLevel(logging.WARNING)
    message = re.compile(r'message: "([^"]*)"')
    harmless = ("No semi_persistent_directory", "Discarding unparseable args")

    class CaseProgress(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            if "beam_brats.py" in text and message.search(text):
                record.msg, record.args, record.name = message.search(text).group(1), (), "shaspec.prepare"
                return True
            return record.levelno >= logging.WARNING and (logs.verbose() or not any(h in text for h in harmless))

    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO)
    forwarded.addFilter(CaseProgress())


def prepare_phantom(args, extra) -> int:
    from shaspec_tf.data.phantom import write_phantom_dataset

    try:
        shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else None
    except ValueError:
        raise ValueError(f"--shape must be three integers D,H,W, got {args.shape!r}") from None
    write_phantom_dataset(args.out, args.cases, shape=shape, seed=args.seed, drop_rate=args.drop_rate)
    print(f"wrote {args.cases} phantom cases to {fileio.absolute(args.out)} (details: phantoms.json)")
    return 0


def prepare_brats(args, extra) -> int:
    from shaspec_tf.data.beam_brats import RejectedCasesError, prepare_brats

    quiet_beam_logs()
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
          f"{fileio.absolute(args.output)} in {manifest['seconds']:.1f} s; rejected {len(manifest['rejected'])}"
          + "".join(f"\n  rejected {r['case_id']}: {r['reason']}" for r in manifest["rejected"]))
    return 0


def prepare_avmnist(args, extra) -> int:
    from shaspec_tf.data.avmnist import build_avmnist, parse_indices, sources_and_speakers

    mnist, fsdd, speakers = sources_and_speakers(args.data_dir, args.mnist, args.fsdd, args.speakers)
    manifest = build_avmnist(mnist, fsdd, args.out, speakers=speakers,
                             train_indices=parse_indices(args.train_indices),
                             test_indices=parse_indices(args.test_indices), all_test=args.all_test,
                             audio_rate=args.audio_rate, seed=args.seed, shards=args.shards)
    counts = ", ".join(f"{k} {v['count']} ({v['audio_count']} with audio)" for k, v in manifest["splits"].items())
    print(f"wrote {fileio.absolute(args.out)}: {counts}")
    return 0


class TrainHelp(argparse.HelpFormatter):
    """``{name}`` in a train option's help: its default, from ``TrainConfig`` or the tasks, read when the help is
    printed (unset options stay ``None``, so each default lives in one place; the trainer imports Keras)."""

    def _expand_help(self, action):
        from shaspec_tf.training.trainer import OptionDefaults

        text = super()._expand_help(action)
        return text.format_map(OptionDefaults()) if "{" in text else text


def train(args, extra) -> int:
    from shaspec_tf.training.trainer import TrainConfig, train

    crop = None
    if args.crop:
        try:
            crop = tuple(int(v) for v in args.crop.split(","))
        except ValueError:
            raise ValueError(f"--crop must be three integers D,H,W, got {args.crop!r}") from None
    probs = None
    if args.drop_probs:
        probs = {}
        for item in args.drop_probs.split(","):
            name, _, value = item.partition("=")
            try:
                probs[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"--drop-probs takes MODALITY=P pairs separated by commas, got {args.drop_probs!r}"
                                 ) from None
    model_options = {}
    for item in args.model_option or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-option takes KEY=VALUE, got {item!r}")
        try:
            model_options[key.strip()] = json.loads(text)
        except ValueError:
            model_options[key.strip()] = text
    options = dict(
        model_options=model_options or None, drop_probs=probs, preset=args.preset, variant=args.variant,
        steps=args.steps, epochs=args.epochs, checkpoint_every=args.checkpoint_every, batch_size=args.batch_size,
        crop_size=crop, regime=args.regime, subset=args.subset, warmup_steps=args.warmup_steps,
        ramp_steps=args.ramp_steps, drop_rate=args.drop_rate,
        learning_rate=args.lr, schedule=args.schedule, optimizer=args.optimizer, weight_decay=args.weight_decay,
        mixed_precision=args.mixed_precision, jit_compile=args.xla, run_eagerly=args.eager, strategy=args.strategy,
        audio_rate=args.audio_rate, seed=args.seed, deterministic=args.deterministic)
    # options not given stay out: TrainConfig (or the task, for None) has their defaults
    config = TrainConfig(task=args.task, data=args.data, out=args.out,
                         **{k: v for k, v in options.items() if v is not None})
    result = train(config)
    last = {k: v[-1] for k, v in result["history"].items() if v}
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items()))
    if result.get("complete"):
        print(f"already trained to step {result['steps']}: {losses}; outputs in {fileio.absolute(args.out)}")
        return 0
    print(f"trained to step {result['steps']} (resumed from {result['resumed_from_step']}): "
          + losses + f"; outputs in {fileio.absolute(args.out)}")
    return 0


def evaluate(args, extra) -> int:
    from shaspec_tf.evaluation import check_report_folder, write_report_folder
    from shaspec_tf.trained import evaluate_trained

    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
    names = [fileio.basename(fileio.absolute(model_dir)) for model_dir in args.model]
    if len(set(names)) < len(names):
        raise ValueError(f"--model folders must have different names (each gets a report subfolder), got "
                         f"{', '.join(names)}")
    check_report_folder(args.out)  # --out is refused before any evaluation unless it is an earlier report of ours
    results = {}
    for name, model_dir in zip(names, args.model):
        results[name] = evaluate_trained(model_dir, args.data, split=args.split, roi_size=roi, overlap=args.overlap,
                                         tta=args.tta, postprocess=args.postprocess,
                                         overlay_cases=args.overlay_cases, precision=args.precision)
    written = write_report_folder(results, args.out, titles={name: f"{name} on {args.data}" for name in names},
                                  comparison_title=f"Models on {args.data}")
    from shaspec_tf.overlays import OVERLAY_FOLDER
    from shaspec_tf.tasks import get_task

    for name in names:
        out = args.out if len(names) == 1 else fileio.join(args.out, name)
        mean, scoring = results[name]["summary"]["mean"], get_task(results[name]["task"]).scoring
        print(f"{name}: mean over subsets " + ", ".join(
            f"{c} {scoring.value(mean, c, scoring.headline) * 100:.2f}" for c in results[name]["columns"])
            + f"; reports in {fileio.absolute(out)}")
        overlays = [key.split(":", 1)[1] for key in written[name] if key.startswith("overlay:")]
        if overlays:
            print(f"{name}: segmentation overlays (reference, full set, worst subsets) of {', '.join(overlays)} in "
                  f"{fileio.join(fileio.absolute(out), OVERLAY_FOLDER)}")
    if len(names) > 1:
        print(f"side-by-side comparison in {fileio.join(fileio.absolute(args.out), 'comparison.md')}")
    return 0


def predict(args, extra) -> int:
    paths = {"flair": args.flair, "t1": args.t1, "t1ce": args.t1ce, "t2": args.t2}
    if args.server:
        if args.model_name is None:
            raise ValueError("--server needs --model-name (the served model's name)")
        if args.roi or args.tta or args.precision or abs(args.overlap - 1 / 3) > 1e-9:
            raise ValueError("--roi, --overlap, --tta and --precision are fixed in the exported graph; leave them out "
                             "with --server")
        from shaspec_tf.serving_client import predict_nifti_remote

        result = predict_nifti_remote(args.server, args.model_name, paths, args.out, protocol=args.protocol,
                                      version=args.model_version, postprocess=args.postprocess,
                                      overwrite=args.overwrite)
    else:
        if args.model_name is not None or args.model_version is not None:
            raise ValueError("--model-name and --model-version go with --server, not --model")
        from shaspec_tf.segment_nifti import predict_nifti

        roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
        result = predict_nifti(args.model, paths, args.out, roi_size=roi, overlap=args.overlap, tta=args.tta,
                               postprocess=args.postprocess, overwrite=args.overwrite, precision=args.precision)
    print(f"segmented from {'+'.join(result['modalities'])}: label voxels {result['label_voxels']} -> "
          f"{fileio.absolute(result['out'])}")
    return 0


def export(args, extra) -> int:
    from shaspec_tf.backends import export_under_tensorflow  # a TensorFlow child process under KERAS_BACKEND=jax

    path = export_under_tensorflow(args.model, args.out, args.name, args.version, overlap=args.overlap)
    print(f"exported {fileio.absolute(args.model)} -> {fileio.absolute(path)}")
    return 0
