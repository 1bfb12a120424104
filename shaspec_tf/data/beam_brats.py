"""BraTS NIfTI cases -> sharded TFRecords with modality masks, as an Apache Beam pipeline.

    shaspec prepare brats --input DIR --output DIR [--eval-fraction 0.2] [--shards 4] [--strict]
                          [--runner DirectRunner|DaskRunner|DataflowRunner ...] [--dask-address tcp://HOST:8786]
                          [...any Beam pipeline option...]

Runs on Beam's DirectRunner with multi-processing by default; every other Beam option (``--runner DataflowRunner
--project ... --region ... --temp_location gs://...``, Flink, Spark) passes through unchanged. ``--runner DaskRunner``
runs it on a ``dask.distributed`` cluster (Beam's experimental Dask runner; needs ``dask[distributed]``): the
scheduler at ``--dask-address`` (Beam's own ``--dask_client_address`` works too), else a local cluster that Beam
starts and this job stops. ``DIR``s may be ``gs://`` URIs; the workers write through Beam's file systems.

The job uses only Beam's core transforms (Create, ParDo, Flatten, GroupByKey), because Beam's file sinks
(``WriteToTFRecord``, ``WriteToText``) and multi-output ParDos do not survive the Dask runner (see
:func:`write_cases`). Each case's file is known before any work: a split's cases, sorted by id, are dealt round-robin
over its shards, so the same input gives the same shards on every runner. The train/eval split is deterministic by
case id (a hash, so adding cases never moves existing ones). A case that fails to load is recorded in the manifest
with its reason and skipped; with ``--strict`` any such case fails the run (every case is still checked, so that the
error and the printed list name all the bad ones at once, and nothing is written).

Output layout (written into a hidden sibling folder, ``.OUTPUT.partial-HOST-PID-RANDOM``, and renamed into place only
when complete, so an interrupted run never leaves output that looks whole; the partial folders of killed runs are
removed by later runs, see :func:`shaspec_tf.fileio.clean_stale`)::

    OUTPUT/train/data-00000-of-0000N.tfrecord     OUTPUT/eval/data-...      OUTPUT/manifest.json
    OUTPUT/.shaspec-output.json                   (the ownership marker: kind "brats-records" and the files written)

A re-run replaces an earlier output only when it proves to be one (:func:`shaspec_tf.fileio.ensure_replaceable`: our
marker, of this kind, and no file the marker does not list; an output written before markers existed passes when its
``manifest.json`` is ours and the folder holds nothing else than that manifest's shards). Anything else is refused
before any work starts, and nothing is touched. A run that writes no case at all is an error, and so is a bad case
with ``--strict``: both fail on one line and leave no output. NIfTI headers declaring more voxels than the files hold
or than ``max_voxels`` allows are rejected before their data is read (see :mod:`shaspec_tf.data.brats`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import struct
import time
from typing import Iterable, List, Optional, Sequence

from shaspec_tf import fileio
from shaspec_tf.data.schema import BRATS_MODALITIES, SCHEMA_VERSION
from shaspec_tf.taskspec.constants import BRATS_SPLITS as SPLITS
from shaspec_tf.taskspec.constants import BRATS_NAME as TASK

TRAIN, EVAL = SPLITS
#: The ownership marker's kind for a ``prepare brats`` output.
KIND = "brats-records"
MANIFEST = "manifest.json"
#: ``--runner`` short names Beam itself does not know, and the runner classes they stand for.
RUNNERS = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}
log = logging.getLogger("shaspec.prepare")


class RejectedCasesError(ValueError):
    """No output because of rejected cases; ``rejected`` holds their ``{"case_id", "reason"}`` records."""

    def __init__(self, message: str, rejected: Sequence[dict] = ()):
        super().__init__(message)
        self.rejected = list(rejected)


class NoCaseWrittenError(RejectedCasesError):
    """Every discovered case was rejected: nothing to write."""


class StrictCaseError(RejectedCasesError):
    """``strict=True`` and at least one case was rejected."""


def split_of(case_id: str, eval_fraction: float) -> str:
    """Deterministic split by case id: a stable hash mapped to [0, 1)."""
    digest = hashlib.sha256(case_id.encode()).digest()
    return EVAL if int.from_bytes(digest[:8], "big") / 2 ** 64 < eval_fraction else TRAIN


def output_files(out: str, shards: int, split_dir: str = "{split}", suffix: str = ".tfrecord") -> List[str]:
    """Every file :func:`write_cases` writes, in the order of their keys: each split's shards
    (``out/<split_dir>/data-0000i-of-0000N<suffix>``), then the case log (``out/_meta/cases-*.jsonl``, written cases;
    ``out/_meta/rejected-*.jsonl``, rejected ones)."""
    return [f"{out}/{split_dir.format(split=split)}/data-{i:05d}-of-{shards:05d}{suffix}"
            for split in SPLITS for i in range(shards)] + [f"{out}/_meta/{name}-00000-of-00001.jsonl"
                                                            for name in ("cases", "rejected")]


def shard_plan(case_ids: Iterable[str], eval_fraction: float, shards: int) -> dict:
    """``{case_id: file key}`` (an index into :func:`output_files`): each split's cases, sorted by id, dealt
    round-robin over its ``shards``."""
    plan = {}
    for index, split in enumerate(SPLITS):
        chosen = sorted(c for c in set(case_ids) if split_of(c, eval_fraction) == split)
        plan.update({case_id: index * shards + i % shards for i, case_id in enumerate(chosen)})
    return plan


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
    """One TFRecord: length (little-endian uint64), its masked CRC-32C, the data, the data's masked CRC-32C."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


class _ProcessCase:
    """Beam DoFn body: ``(files, key)`` -> ``(key, serialized example)`` and ``(log key, case record)``, or
    ``(rejected key, rejection record)``."""

    def __init__(self, eval_fraction, require_label, strict, crop_to_brain, max_voxels=None, shards=1):
        self.eval_fraction, self.require_label = eval_fraction, require_label
        self.strict, self.crop_to_brain, self.max_voxels = strict, crop_to_brain, max_voxels
        self.shards = shards
        self.meta_key, self.rejected_key = len(SPLITS) * shards, len(SPLITS) * shards + 1

    def __call__(self, item):
        from shaspec_tf.data.brats import load_case, preprocess
        from shaspec_tf.data.schema import brats_example

        files, key = item
        start = time.time()
        try:
            record = preprocess(load_case(files, require_label=self.require_label, max_voxels=self.max_voxels),
                                crop_to_brain=self.crop_to_brain)
            example = brats_example(record).SerializeToString()
        except Exception as error:  # one bad case is reported, not fatal, unless --strict
            if self.strict:
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("rejected %s: %s", files.case_id, reason)
            yield self.rejected_key, json.dumps({"case_id": files.case_id, "reason": reason})
            return
        split = SPLITS[key // self.shards]
        log.info("case %s -> %s in %.1f s", files.case_id, split, time.time() - start)
        yield key, example
        yield self.meta_key, json.dumps({
            "case_id": record.case_id, "split": split, "modality_mask": [int(v) for v in record.modality_mask],
            "shape": list(record.image.shape[:3]), "labelled": record.label is not None})


class _WriteFile:
    """Beam DoFn body: ``(key, values)`` -> the file ``paths[key]``, through Beam's file systems (so a worker writes
    ``gs://`` with Beam's GCS client; ``.gz``: GZIP). TFRecords for the split shards, JSON lines for the case log;
    ``None`` values (each file's placeholder) are skipped, so a file with no case is still written, empty."""

    def __init__(self, paths: Sequence[str], records: int):
        self.paths, self.records = list(paths), records

    def __call__(self, group):
        from apache_beam.io.filesystems import FileSystems

        key, values = group
        count = 0
        handle = FileSystems.create(self.paths[key])
        try:
            for value in values:
                if value is not None:
                    handle.write(tfrecord_frame(value) if key < self.records else value.encode("utf-8") + b"\n")
                    count += 1
        finally:
            handle.close()
        log.info("wrote %d records to %s", count, self.paths[key])
        return ()


def write_cases(p, cases, out: str, eval_fraction: float, shards: int, require_label: bool = True,
                strict: bool = False, crop_to_brain: bool = True, split_dir: str = "{split}",
                suffix: str = ".tfrecord", max_voxels: Optional[int] = None) -> None:
    """Add the case processing to the Beam pipeline ``p``: each split's examples go to
    ``out/<split_dir>/data-*<suffix>`` (``".gz"``: GZIP; every shard is written, empty if no case falls in it), the
    per-case log to ``out/_meta`` (see :func:`read_case_log`). ``max_voxels``: see
    :func:`shaspec_tf.data.brats.load_case` (resolved here, so that workers do not depend on their own environment).

    One output per case element, keyed by its file, one GroupByKey, one writing step that is the pipeline's only
    leaf: Beam 2.74's Dask runner computes only the last leaf of a pipeline (other branches never run), hands every
    tagged output of a ParDo to each consumer, and recomputes side inputs wherever they are read (Beam's file sinks
    then write their temporary files several times and, without a fixed shard count, finalize an empty file)."""
    import apache_beam as beam

    from shaspec_tf.data.brats import max_voxels_limit

    paths = output_files(out, shards, split_dir, suffix)
    plan = shard_plan([c.case_id for c in cases], eval_fraction, shards)
    process = _ProcessCase(eval_fraction, require_label, strict, crop_to_brain, max_voxels_limit(max_voxels), shards)
    records = (p | "Cases" >> beam.Create([(c, plan[c.case_id]) for c in cases])
               | "Process" >> beam.FlatMap(process))
    every_file = p | "Files" >> beam.Create([(key, None) for key in range(len(paths))])
    _ = ((records, every_file) | "Flatten" >> beam.Flatten() | "ByFile" >> beam.GroupByKey()
         | "Write" >> beam.FlatMap(_WriteFile(paths, len(SPLITS) * shards)))


def read_case_log(out: str):
    """``(written, rejected)`` case records from the log :func:`write_cases` left in ``out/_meta`` (then removed)."""
    metas = [json.loads(line) for line in _read_lines(f"{out}/_meta/cases*.jsonl")]
    rejected = [json.loads(line) for line in _read_lines(f"{out}/_meta/rejected*.jsonl")]
    fileio.remove_tree(f"{out}/_meta")
    return metas, rejected


def _take(args: List[str], name: str) -> Optional[str]:
    """Remove every ``--name X`` / ``--name=X`` from ``args``; the last value (``None`` if absent)."""
    value, i = None, 0
    while i < len(args):
        if args[i].startswith(f"{name}="):
            value = args.pop(i).split("=", 1)[1]
        elif args[i] == name:
            args.pop(i)
            if i >= len(args):
                raise ValueError(f"{name} needs a value")
            value = args.pop(i)
        else:
            i += 1
    return value


def _pipeline_options(beam_args: Sequence[str], workers: int, runner: Optional[str] = None,
                      dask_address: Optional[str] = None):
    """Beam's options: ``beam_args`` with the runner resolved (``runner``, else ``--runner`` in ``beam_args``, else
    the DirectRunner with ``workers`` processes; a name in :data:`RUNNERS` becomes its class path) and, on the Dask
    runner, ``dask_address`` (or ``--dask-address`` in ``beam_args``) as the scheduler and one case per partition
    unless ``--dask_npartitions`` / ``--dask_partition_size`` say otherwise."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args)
    given, given_address = _take(args, "--runner"), _take(args, "--dask-address")
    runner, dask_address = runner or given or "DirectRunner", dask_address or given_address
    dask = RUNNERS.get(runner, runner) == RUNNERS["DaskRunner"]
    if dask_address and not dask:
        raise ValueError(f"--dask-address is an option of --runner DaskRunner, not of {runner}")
    if dask:
        try:
            import distributed  # noqa: F401 -- Beam's Dask runner needs it
        except ImportError:
            raise ValueError("--runner DaskRunner needs dask's distributed scheduler: pip install 'dask[distributed]'") \
                from None
        if dask_address:
            args.append(f"--dask_client_address={dask_address}")
        if not any(a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in args):
            args.append("--dask_partition_size=1")
    args.append(f"--runner={RUNNERS.get(runner, runner)}")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
    return PipelineOptions(args)


def _run(pipeline) -> None:
    """Run ``pipeline`` to the end. The Dask runner leaves its client connected (and, without an address, its local
    cluster running); both are closed here."""
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()


def _read_lines(pattern: str) -> List[str]:
    lines = []
    for path in fileio.glob(pattern):
        lines += [line for line in fileio.read_text(path).splitlines() if line.strip()]
    return lines


def check_options(eval_fraction: float, shards: int, workers: Optional[int] = None) -> None:
    """One-line ``ValueError`` unless ``0 <= eval_fraction < 1``, ``shards >= 1`` and ``workers`` (if given)
    ``>= 1``."""
    try:
        fraction = float(eval_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1) (the share of cases held out for evaluation), got "
                         f"{eval_fraction!r}")
    for name, value in (("shards", shards), ("workers", workers)):
        if value is None and name == "workers":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _read_json(path: str):
    try:
        return fileio.read_json(path)
    except Exception:  # noqa: BLE001 -- absent, unreadable or not JSON: not ours
        return None


def legacy_output(folder: str) -> bool:
    """Whether ``folder`` (no ownership marker) is a ``prepare brats`` output written before markers existed: its
    ``manifest.json`` is ours (``task`` brats, our ``schema_version``, an integer ``shards``) and the folder holds
    nothing beyond that manifest and the shards it implies (``{train,eval}/data-0000i-of-0000N.tfrecord``)."""
    folder = str(folder).rstrip("/")
    manifest = _read_json(f"{folder}/{MANIFEST}")
    if not isinstance(manifest, dict) or manifest.get("task") != TASK or \
            manifest.get("schema_version") != SCHEMA_VERSION:
        return False
    shards = manifest.get("shards")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 100_000:
        return False
    implied = {MANIFEST} | {f"{split}/data-{i:05d}-of-{shards:05d}.tfrecord" for split in SPLITS
                            for i in range(shards)}
    return set(fileio.list_files(folder)) <= implied


def prepare_brats(input_dir: str, output_dir: str, eval_fraction: float = 0.2, shards: int = 1,
                  require_label: bool = True, strict: bool = False, crop_to_brain: bool = True,
                  beam_args: Iterable[str] = (), workers: Optional[int] = None,
                  max_voxels: Optional[int] = None, runner: Optional[str] = None,
                  dask_address: Optional[str] = None) -> dict:
    """Run the pipeline and return the manifest (also written to ``OUTPUT/manifest.json``).

    ``runner``: ``DirectRunner`` (the default, ``workers`` processes), ``DaskRunner`` (on the ``dask.distributed``
    scheduler at ``dask_address``, else on a local cluster started for the run) or any runner Beam knows; it
    overrides a ``--runner`` in ``beam_args``, which pass to Beam as they are.

    Before any work: the options are checked (:func:`check_options`; ``max_voxels`` per volume, default
    :func:`shaspec_tf.data.brats.max_voxels_limit`), and an existing ``output_dir`` must be an earlier output of
    this command (see the module docstring) or empty. Errors, all one line, all leaving ``output_dir`` as it was and
    no partial folder: :class:`StrictCaseError` (``strict`` and any case rejected), :class:`NoCaseWrittenError`
    (every case rejected); their ``rejected`` lists every rejected case and why."""
    import apache_beam as beam

    from shaspec_tf.data.brats import discover_cases, max_voxels_limit

    check_options(eval_fraction, shards, workers)
    eval_fraction, shards = float(eval_fraction), int(shards)
    max_voxels = max_voxels_limit(max_voxels)
    output_dir = str(output_dir).rstrip("/") or "/"
    fileio.ensure_replaceable(output_dir, KIND, legacy=legacy_output)
    cases = discover_cases(input_dir)
    workers = workers or max(1, min(os.cpu_count() or 1, len(cases)))
    pipeline = beam.Pipeline(options=_pipeline_options(list(beam_args), workers, runner, dask_address))
    staging = fileio.staging_dir(output_dir)
    log.info("preparing %d BraTS cases from %s into %s", len(cases), input_dir, output_dir)
    start = time.time()
    try:
        # strict is enforced below, not by failing the Beam job: a worker's exception comes back as a traceback of
        # a few hundred lines (printed by the worker itself), retried on some runners, and names one case only.
        write_cases(pipeline, cases, staging, eval_fraction, shards, require_label, strict=False,
                    crop_to_brain=crop_to_brain, max_voxels=max_voxels)
        _run(pipeline)
        metas, rejected = read_case_log(staging)
        manifest = build_manifest(input_dir, cases, metas, rejected, eval_fraction, shards, time.time() - start)
        if not metas or (strict and rejected):
            first = (manifest["rejected"] or [{"case_id": "?", "reason": "no record came back"}])[0]
            what = (f"{len(rejected)} of {len(cases)} cases rejected with --strict" if strict and metas else
                    f"no case written, all {len(cases)} discovered cases were rejected")
            raise (StrictCaseError if strict else NoCaseWrittenError)(
                f"{input_dir}: {what} (first: {first['case_id']}: {first['reason']}); nothing written to "
                f"{output_dir}", manifest["rejected"])
        fileio.atomic_write(f"{staging}/{MANIFEST}", json.dumps(manifest, indent=2))
        fileio.replace_dir(staging, output_dir, KIND, legacy=legacy_output)
    except BaseException:
        fileio.remove_tree(staging)
        raise
    log.info("wrote %d cases (%d rejected) in %.1f s", len(metas), len(rejected), manifest["seconds"])
    return manifest


def build_manifest(input_dir, cases, metas, rejected, eval_fraction, shards, seconds) -> dict:
    """The ``manifest.json`` of a run of :func:`write_cases` (per-split counts, rejected cases, timing), from the
    case log that :func:`read_case_log` read back."""
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
    return {"schema_version": SCHEMA_VERSION, "task": TASK, "source": fileio.absolute(input_dir),
            "modalities": list(BRATS_MODALITIES), "eval_fraction": eval_fraction, "shards": shards,
            "discovered": len(cases), "written": len(metas), "splits": per_split,
            "rejected": sorted(rejected, key=lambda r: r["case_id"]), "seconds": round(seconds, 2)}
