"""The command line of ``python -m shaspec_tf.data.avmnist`` (:func:`main`) and the option parsing the
``shaspec prepare avmnist`` command shares (:func:`sources_and_speakers`, :func:`parse_indices`)."""
from __future__ import annotations

import argparse
import sys

from shaspec_tf.data.avmnist.build import build_avmnist
from shaspec_tf.data.avmnist.sources import DEFAULT_SPEAKERS, default_sources


def sources_and_speakers(data_dir=None, mnist_npz=None, fsdd_dir=None, speakers: str = "jackson,nicolas,theo"):
    """Command-line options -> ``(mnist_npz, fsdd_dir, speakers)`` for :func:`build_avmnist`: unset sources come
    from :func:`default_sources` (``data_dir``), ``speakers`` is comma-separated or ``"all"`` (-> ``None``)."""
    if mnist_npz is None or fsdd_dir is None:
        default_npz, default_fsdd = default_sources(data_dir)
        mnist_npz, fsdd_dir = mnist_npz or default_npz, fsdd_dir or default_fsdd
    names = None if speakers == "all" else tuple(s for s in speakers.split(",") if s)
    return mnist_npz, fsdd_dir, names


def parse_indices(text: str):
    """"START:STOP" -> range(START, STOP); "a,b,c" -> [a, b, c] (recording indices, >= 0); "" -> []. One-line
    ``ValueError`` for anything else."""
    start, colon, stop = text.partition(":")
    try:
        values = range(int(start), int(stop)) if colon else [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"recording indices must be START:STOP or a comma list of integers, got {text!r}") from None
    if colon and int(stop) <= int(start):
        raise ValueError(f"recording indices {text!r}: STOP must be greater than START")
    if any(v < 0 for v in values):
        raise ValueError(f"recording indices must be >= 0, got {text!r}")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shaspec_tf.data.avmnist",
                                     description="Build AV-MNIST (SMIL protocol) TFRecords from MNIST + FSDD.")
    parser.add_argument("out_dir")
    parser.add_argument("--data-dir", help="folder with mnist8k.npz and fsdd/recordings (default: SHASPEC_DATA "
                                           "or ../shared/data)")
    parser.add_argument("--mnist-npz")
    parser.add_argument("--fsdd-dir")
    parser.add_argument("--speakers", default=",".join(DEFAULT_SPEAKERS), help="comma-separated, or 'all'")
    parser.add_argument("--train-indices", default="15:50", help="START:STOP or a comma list")
    parser.add_argument("--test-indices", default="5:15", help="START:STOP or a comma list")
    parser.add_argument("--all-test", action="store_true")
    parser.add_argument("--audio-rate", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        mnist_npz, fsdd_dir, speakers = sources_and_speakers(args.data_dir, args.mnist_npz, args.fsdd_dir,
                                                             args.speakers)
        manifest = build_avmnist(mnist_npz, fsdd_dir, args.out_dir, speakers=speakers,
                                 train_indices=parse_indices(args.train_indices),
                                 test_indices=parse_indices(args.test_indices),
                                 all_test=args.all_test, audio_rate=args.audio_rate, seed=args.seed,
                                 shards=args.shards)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v['count']} ({v['audio_count']} with audio)" for k, v in manifest["splits"].items())
    print(f"wrote {args.out_dir}: {counts}")
    return 0
