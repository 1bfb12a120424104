"""``CurateSchema``: SchemaGen's inferred schema plus the rules of the shaspec-tf record contract.

An inferred schema only knows what the training data happened to hold. The contract says more, and ExampleValidator
should flag any record that breaks it (``shaspec_tf.data.schema``):

* ``present_modalities``: 1 to M values, each one of the task's modality names (an all-absent case has none);
* ``modality_mask``: exactly M values in {0, 1};
* BraTS ``label_values``: each in {0, 1, 2, 4} (a BraTS 2023 label 3 or a stray value is an anomaly);
* AV-MNIST ``label``: one value in 0..9;
* ``schema_version``: the version this code writes.

StatisticsGen runs over these small features only (:data:`STATS_FEATURES`): the volumes themselves are bytes.
"""

from tfx import v1 as tfx
from tfx.types import standard_artifacts

from shaspec_tf.data.schema import AVMNIST_MODALITIES, BRATS_MODALITIES, SCHEMA_VERSION

InputArtifact = tfx.dsl.components.InputArtifact
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter

SCHEMA_FILE = "schema.pbtxt"
BRATS_LABEL_VALUES = ("0", "1", "2", "4")
STATS_FEATURES = {
    "brats": ["schema_version", "task", "modality_mask", "present_modalities", "label_values", "has_label",
              "spacing", "image_shape", "original_shape"],
    "avmnist": ["schema_version", "task", "modality_mask", "present_modalities", "label", "speaker"],
}
MODALITIES = {"brats": BRATS_MODALITIES, "avmnist": AVMNIST_MODALITIES}


def _feature(schema, name):
    for feature in schema.feature:
        if feature.name == name:
            return feature
    feature = schema.feature.add(name=name)
    return feature


def _strings(schema, name, values, min_count, max_count=None):
    from tensorflow_metadata.proto.v0 import schema_pb2

    feature = _feature(schema, name)
    feature.type = schema_pb2.BYTES
    feature.ClearField("domain")
    feature.string_domain.Clear()
    feature.string_domain.value.extend(values)
    feature.ClearField("shape")
    feature.value_count.min = min_count
    if max_count is not None:
        feature.value_count.max = max_count
    feature.presence.min_fraction = 1.0
    feature.presence.min_count = 1


def _ints(schema, name, low, high, count=None):
    from tensorflow_metadata.proto.v0 import schema_pb2

    feature = _feature(schema, name)
    feature.type = schema_pb2.INT
    feature.ClearField("domain")
    feature.int_domain.min, feature.int_domain.max = low, high
    if count is not None:
        feature.ClearField("shape")
        feature.value_count.min = feature.value_count.max = count
    feature.presence.min_fraction = 1.0
    feature.presence.min_count = 1


def curate_schema(schema, task: str):
    """Apply the contract's rules for ``task`` (``brats`` / ``avmnist``) to a ``schema_pb2.Schema`` in place."""
    if task not in MODALITIES:
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(MODALITIES)}")
    modalities = MODALITIES[task]
    # Drop top-level domains the inference made for features we now describe inline.
    keep = [d for d in schema.string_domain if d.name not in ("present_modalities", "label_values", "task")]
    del schema.string_domain[:]
    schema.string_domain.extend(keep)
    _strings(schema, "present_modalities", modalities, 1, len(modalities))
    _strings(schema, "task", [task], 1, 1)
    _ints(schema, "modality_mask", 0, 1, len(modalities))
    _ints(schema, "schema_version", SCHEMA_VERSION, SCHEMA_VERSION, 1)
    if task == "brats":
        _strings(schema, "label_values", BRATS_LABEL_VALUES, 0, len(BRATS_LABEL_VALUES))
        _feature(schema, "label_values").presence.min_fraction = 0.0   # an unlabelled case has none
    else:
        _ints(schema, "label", 0, 9, 1)
    return schema


@tfx.dsl.components.component
def CurateSchema(schema: InputArtifact[standard_artifacts.Schema],
                 curated: OutputArtifact[standard_artifacts.Schema],
                 task: Parameter[str]):
    """SchemaGen's schema -> the same with the contract's rules for ``task`` (see the module docstring)."""
    import os

    import tensorflow_data_validation as tfdv

    inferred = tfdv.load_schema_text(os.path.join(schema.uri, SCHEMA_FILE))
    tfdv.write_schema_text(curate_schema(inferred, task), os.path.join(curated.uri, SCHEMA_FILE))
