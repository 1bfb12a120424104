"""BraTS NIfTI cases -> sharded TFRecords with modality masks, as an Apache Beam pipeline.

    shaspec prepare brats --input DIR --output DIR [--eval-fraction 0.2] [--shards 4] [--strict]
                          [--runner DirectRunner ...any Beam pipeline option...]

Runs on Beam's DirectRunner with multi-processing by default; every other Beam option (``--runner DataflowRunner
--project ... --region ... --temp_location gs://...``, Flink, Spark) passes through unchanged. The train/eval split is
deterministic by case id (a hash, so adding cases never moves existing ones). A case that fails to load is recorded
in the manifest with its reason and skipped, or fails the job with ``--strict``.

Output layout (written into a temporary sibling folder and renamed into place only when complete, so an interrupted
run never leaves output that looks whole, and a re-run replaces the old output)::

    OUTPUT/train/data-00000-of-0000N.tfrecord     OUTPUT/eval/data-...      OUTPUT/manifest.json
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Iterable, List, Optional, Sequence

from shaspec_tf.data.schema import BRATS_MODALITIES, SCHEMA_VERSION

SPLITS = ("train", "eval")
log = logging.getLogger("shaspec.prepare")


def split_of(case_id: str, eval_fraction: float) -> str:
    """Deterministic split by case id: a stable hash mapped to [0, 1)."""
    digest = hashlib.sha256(case_id.encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction else "train"


class _ProcessCase:
    """Beam DoFn body: files -> (split, serialized example) or a rejection record."""

    def __init__(self, eval_fraction, require_label, strict, crop_to_brain):
        self.eval_fraction, self.require_label = eval_fraction, require_label
        self.strict, self.crop_to_brain = strict, crop_to_brain

    def __call__(self, files):
        import apache_beam as beam

        from shaspec_tf.data.brats import load_case, preprocess
        from shaspec_tf.data.schema import brats_example

        start = time.time()
        try:
            record = preprocess(load_case(files, require_label=self.require_label),
                                crop_to_brain=self.crop_to_brain)
            example = brats_example(record).SerializeToString()
        except Exception as error:  # one bad case is reported, not fatal, unless --strict
            if self.strict:
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("rejected %s: %s", files.case_id, reason)
            yield beam.pvalue.TaggedOutput("rejected", json.dumps({"case_id": files.case_id, "reason": reason}))
            return
        split = split_of(files.case_id, self.eval_fraction)
        log.info("case %s -> %s in %.1f s", files.case_id, split, time.time() - start)
        yield beam.pvalue.TaggedOutput(split, example)
        yield beam.pvalue.TaggedOutput("meta", json.dumps({
            "case_id": record.case_id, "split": split, "modality_mask": [int(v) for v in record.modality_mask],
            "shape": list(record.image.shape[:3]), "labelled": record.label is not None}))


def write_cases(p, cases, out: str, eval_fraction: float, shards: int, require_label: bool = True,
                strict: bool = False, crop_to_brain: bool = True, split_dir: str = "{split}",
                suffix: str = ".tfrecord") -> None:
    """Add the case processing to the Beam pipeline ``p``: each split's examples go to
    ``out/<split_dir>/data-*<suffix>`` (``".gz"``: GZIP), the per-case log to ``out/_meta`` (see
    :func:`read_case_log`)."""
    import apache_beam as beam

    results = (p | "Cases" >> beam.Create(cases)
               | "Process" >> beam.ParDo(_ProcessCase(eval_fraction, require_label, strict, crop_to_brain))
               .with_outputs(*SPLITS, "meta", "rejected"))
    for split in SPLITS:
        _ = results[split] | f"Write{split}" >> beam.io.WriteToTFRecord(
            f"{out}/{split_dir.format(split=split)}/data", file_name_suffix=suffix, num_shards=shards)
    _ = results.meta | "WriteMeta" >> beam.io.WriteToText(f"{out}/_meta/cases", file_name_suffix=".jsonl")
    _ = results.rejected | "WriteRejected" >> beam.io.WriteToText(f"{out}/_meta/rejected", file_name_suffix=".jsonl")


def read_case_log(out: str):
    """``(written, rejected)`` case records from the log :func:`write_cases` left in ``out/_meta`` (then removed)."""
    import tensorflow as tf

    metas = [json.loads(line) for line in _read_lines(f"{out}/_meta/cases*.jsonl")]
    rejected = [json.loads(line) for line in _read_lines(f"{out}/_meta/rejected*.jsonl")]
    tf.io.gfile.rmtree(f"{out}/_meta")
    return metas, rejected


def _pipeline_options(beam_args: Sequence[str], workers: int):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    runner = None
    for i, a in enumerate(args):  # "--runner=X" or "--runner X"
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
        elif a == "--runner" and i + 1 < len(args):
            runner = args[i + 1]
    if runner is None:
        runner = "DirectRunner"
        args.append("--runner=DirectRunner")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    return PipelineOptions(args)


def _read_lines(pattern: str) -> List[str]:
    import tensorflow as tf

    lines = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        with tf.io.gfile.GFile(path) as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    return lines


def prepare_brats(input_dir: str, output_dir: str, eval_fraction: float = 0.2, shards: int = 1,
                  require_label: bool = True, strict: bool = False, crop_to_brain: bool = True,
                  beam_args: Iterable[str] = (), workers: Optional[int] = None) -> dict:
    """Run the pipeline and return the manifest (also written to ``OUTPUT/manifest.json``)."""
    import apache_beam as beam
    import tensorflow as tf

    from shaspec_tf.data.brats import discover_cases

    cases = discover_cases(input_dir)
    workers = workers or max(1, min(os.cpu_count() or 1, len(cases)))
    output_dir = output_dir.rstrip("/")
    staging = f"{os.path.dirname(output_dir) or '.'}/.{os.path.basename(output_dir)}.partial-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(staging)
    log.info("preparing %d BraTS cases from %s into %s", len(cases), input_dir, output_dir)
    start = time.time()
    try:
        with beam.Pipeline(options=_pipeline_options(list(beam_args), workers)) as p:
            write_cases(p, cases, staging, eval_fraction, shards, require_label, strict, crop_to_brain)
        metas, rejected = read_case_log(staging)
        manifest = _manifest(input_dir, cases, metas, rejected, eval_fraction, shards, time.time() - start)
        with tf.io.gfile.GFile(f"{staging}/manifest.json", "w") as f:
            f.write(json.dumps(manifest, indent=2))
        _swap_into_place(staging, output_dir)
    except BaseException:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
        raise
    log.info("wrote %d cases (%d rejected) in %.1f s", len(metas), len(rejected), manifest["seconds"])
    return manifest


def _manifest(input_dir, cases, metas, rejected, eval_fraction, shards, seconds) -> dict:
    per_split = {}
    for split in SPLITS:
        rows = [m for m in metas if m["split"] == split]
        per_split[split] = {
            "cases": len(rows),
            "labelled": sum(m["labelled"] for m in rows),
            "modality_available": {name: sum(m["modality_mask"][i] for m in rows)
                                   for i, name in enumerate(BRATS_MODALITIES)},
            "case_ids": sorted(m["case_id"] for m in rows),
        }
    return {"schema_version": SCHEMA_VERSION, "task": "brats", "source": os.path.abspath(input_dir),
            "modalities": list(BRATS_MODALITIES), "eval_fraction": eval_fraction, "shards": shards,
            "discovered": len(cases), "written": len(metas), "splits": per_split,
            "rejected": sorted(rejected, key=lambda r: r["case_id"]), "seconds": round(seconds, 2)}


def _swap_into_place(staging: str, output_dir: str) -> None:
    """Replace ``output_dir`` by the completed ``staging`` folder (old output removed only after the swap)."""
    import tensorflow as tf

    old = None
    if tf.io.gfile.exists(output_dir):
        if tf.io.gfile.listdir(output_dir) and not tf.io.gfile.exists(f"{output_dir}/manifest.json"):
            raise FileExistsError(f"{output_dir} exists and is not an earlier 'shaspec prepare' output; "
                                  f"refusing to replace it")
        old = f"{staging}.old"
        tf.io.gfile.rename(output_dir, old)
    tf.io.gfile.rename(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else tf.io.gfile.rmtree(old)
