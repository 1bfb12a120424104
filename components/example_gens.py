"""TFX example gens around the data layer's Beam transforms: BraTS NIfTI cases and AV-MNIST (FSDD + MNIST) into a
standard ``Examples`` artifact.

Both write GZIP TFRecords of ``tf.train.Example`` in the shaspec-tf contract (``shaspec_tf.data.schema``) under
``Split-{name}/``, one split list on the artifact (BraTS: ``train, eval``; AV-MNIST: ``train, test``, the SMIL
protocol), and a ``manifest.json`` beside them (cases written and rejected, modality availability). The Beam pipeline
is the one TFX makes from the pipeline's ``beam_pipeline_args`` (DirectRunner locally, Dataflow in the cloud).

``input_fingerprint`` is not read by the executors: the pipeline fills it with :func:`fingerprint`, a digest of the
input files (names, sizes, modification times; ``shaspec_tf.data.files.input_fingerprint``), so that TFX's cache
reuses an earlier run exactly when the inputs are unchanged. Inputs and outputs may be URIs (``gs://...``): every
file access goes through ``shaspec_tf.fileio``.
"""

import apache_beam as beam
from tfx import v1 as tfx
from tfx.types import artifact_utils, standard_artifacts

from shaspec_tf import fileio
from shaspec_tf.data.files import input_fingerprint as fingerprint  # noqa: F401 -- pipeline.py's import
from shaspec_tf.taskspec.constants import AVMNIST_SPLITS
from shaspec_tf.taskspec.constants import BRATS_SPLITS

Examples = standard_artifacts.Examples
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter
BeamComponentParameter = tfx.dsl.components.BeamComponentParameter


def _mark_examples(examples, splits) -> None:
    examples.split_names = artifact_utils.encode_split_names(list(splits))
    examples.set_string_custom_property("payload_format", "FORMAT_TF_EXAMPLE")
    examples.set_string_custom_property("file_format", "tfrecords_gzip")


def _write_split(pcoll, uri: str, split: str, shards: int, label: str):
    return pcoll | label >> beam.io.WriteToTFRecord(f"{uri}/Split-{split}/data", file_name_suffix=".gz",
                                                    num_shards=shards)


def _write_manifest(uri: str, manifest: dict) -> None:
    fileio.atomic_write_json(fileio.join(uri, "manifest.json"), manifest, sort_keys=True)


@tfx.dsl.components.component(use_beam=True)
def BratsExampleGen(
        examples: OutputArtifact[Examples],
        input_dir: Parameter[str],
        eval_fraction: Parameter[float] = 0.2,
        shards: Parameter[int] = 1,
        require_label: Parameter[bool] = True,
        crop_to_brain: Parameter[bool] = True,
        strict: Parameter[bool] = False,
        input_fingerprint: Parameter[str] = "",
        beam_pipeline: BeamComponentParameter[beam.Pipeline] = None):
    """BraTS 2018-2021 / 2023 case folders (``input_dir``) -> ``Examples`` with ``train`` / ``eval`` splits.

    Cases are read, checked (shapes, affines, NaNs, labels), cropped to the brain and z-scored per sequence by
    ``shaspec_tf.data.brats``; the split is a stable hash of the case id. A case that fails is listed in the
    manifest with its reason and skipped (``strict``: fails the component). No case written at all, or an empty
    split, fails the component rather than passing on data that looks whole.
    """
    import time

    from shaspec_tf.data.beam_brats import build_manifest, read_case_log, write_cases
    from shaspec_tf.data.brats import discover_cases

    cases = discover_cases(input_dir)
    uri = examples.uri
    start = time.time()
    with beam_pipeline as p:
        write_cases(p, cases, uri, eval_fraction, shards, require_label, strict, crop_to_brain,
                    split_dir="Split-{split}", suffix=".gz")
    metas, rejected = read_case_log(uri)
    manifest = build_manifest(input_dir, cases, metas, rejected, eval_fraction, shards, time.time() - start)
    _write_manifest(uri, manifest)
    empty = [split for split in BRATS_SPLITS if manifest["splits"][split]["cases"] == 0]
    if empty:
        raise ValueError(f"{input_dir}: no cases in split(s) {empty} ({manifest['written']} written, "
                         f"{len(rejected)} rejected); add cases or change eval_fraction")
    _mark_examples(examples, BRATS_SPLITS)
    examples.set_int_custom_property("cases", manifest["written"])
    examples.set_int_custom_property("rejected_cases", len(rejected))


@tfx.dsl.components.component(use_beam=True)
def AvMnistExampleGen(
        examples: OutputArtifact[Examples],
        input_dir: Parameter[str],
        speakers: Parameter[str] = "jackson,nicolas,theo",
        train_indices: Parameter[str] = "15:50",
        test_indices: Parameter[str] = "5:15",
        audio_rate: Parameter[float] = 1.0,
        seed: Parameter[int] = 0,
        shards: Parameter[int] = 1,
        input_fingerprint: Parameter[str] = "",
        beam_pipeline: BeamComponentParameter[beam.Pipeline] = None):
    """AV-MNIST by the SMIL protocol (``shaspec_tf.data.avmnist``) -> ``Examples`` with ``train`` / ``test``.

    ``input_dir`` holds ``mnist8k.npz`` and ``fsdd/recordings``. The pairing of recordings with MNIST images and the
    choice of which training samples keep their audio (``audio_rate``) are planned up front; Beam then turns each
    planned sample into a record (MFCCs of its WAV) in parallel.
    """
    from shaspec_tf.data.avmnist import avmnist_job_example, parse_indices, plan_avmnist, sources_and_speakers

    mnist_npz, fsdd, names = sources_and_speakers(input_dir, speakers=speakers)
    manifest, jobs = plan_avmnist(mnist_npz, fsdd, names, parse_indices(test_indices),
                                  parse_indices(train_indices), audio_rate=audio_rate, seed=seed, shards=shards)
    uri = examples.uri
    with beam_pipeline as p:
        for split in AVMNIST_SPLITS:
            chosen = [job for job in jobs if job.split == split]
            records = (p | f"Plan{split}" >> beam.Create(chosen)
                       | f"Make{split}" >> beam.Map(avmnist_job_example))
            _write_split(records, uri, split, shards, f"Write{split}")
    for split in AVMNIST_SPLITS:
        manifest["splits"][split]["files"] = [
            fileio.basename(f) for f in fileio.glob(fileio.join(uri, f"Split-{split}", "*"))]
    _write_manifest(uri, manifest)
    _mark_examples(examples, AVMNIST_SPLITS)
    examples.set_int_custom_property("samples", len(jobs))
