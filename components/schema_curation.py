"""``CurateSchema``: SchemaGen's inferred schema plus the rules of the shaspec-tf record contract.

An inferred schema only knows what the training data happened to hold. The contract says more, and ExampleValidator
should flag any record that breaks it (``shaspec_tf.data.schema``):

* ``present_modalities``: 1 to M values, each one of the task's modality names (an all-absent case has none);
* ``modality_mask``: exactly M values in {0, 1};
* BraTS ``label_values``: each in {0, 1, 2, 4} (a BraTS 2023 label 3 or a stray value is an anomaly);
* AV-MNIST ``label``: one value in 0..9;
* ``schema_version``: the version this code writes.

Each task states its rules (``shaspec_tf.tasks.Task.schema_rules``: the common features above, then its labels).
StatisticsGen runs over the task's small features only (``Task.stats_features``): the volumes themselves are bytes.
"""

from tfx import v1 as tfx
from tfx.types import standard_artifacts

from shaspec_tf.tasks import get_task

InputArtifact = tfx.dsl.components.InputArtifact
OutputArtifact = tfx.dsl.components.OutputArtifact
Parameter = tfx.dsl.components.Parameter

SCHEMA_FILE = "schema.pbtxt"


def stats_features(task: str) -> list:
    """The features StatisticsGen summarises for ``task`` (``Task.stats_features``)."""
    return list(get_task(task).stats_features)


def _feature(schema, name):
    for feature in schema.feature:
        if feature.name == name:
            return feature
    feature = schema.feature.add(name=name)
    return feature


def _apply(schema, rule) -> None:
    """One :class:`shaspec_tf.tasks.FeatureRule`: the feature's type, domain, value count and presence."""
    from tensorflow_metadata.proto.v0 import schema_pb2

    feature = _feature(schema, rule.name)
    feature.ClearField("domain")
    if rule.ints is None:
        feature.type = schema_pb2.BYTES
        feature.string_domain.Clear()
        feature.string_domain.value.extend(rule.strings)
    else:
        feature.type = schema_pb2.INT
        feature.int_domain.min, feature.int_domain.max = rule.ints
    if rule.min_count is not None or rule.max_count is not None:
        feature.ClearField("shape")
        if rule.min_count is not None:
            feature.value_count.min = rule.min_count
        if rule.max_count is not None:
            feature.value_count.max = rule.max_count
    feature.presence.min_fraction = 1.0
    feature.presence.min_count = 1
    if rule.min_fraction != 1.0:
        feature.presence.min_fraction = rule.min_fraction


def curate_schema(schema, task: str):
    """Apply the contract's rules for ``task`` (``Task.schema_rules``) to a ``schema_pb2.Schema`` in place."""
    rules = get_task(task).schema_rules()
    # Drop top-level domains the inference made for features we now describe inline.
    inline = {rule.name for rule in rules if rule.ints is None}
    keep = [d for d in schema.string_domain if d.name not in inline]
    del schema.string_domain[:]
    schema.string_domain.extend(keep)
    for rule in rules:
        _apply(schema, rule)
    return schema


@tfx.dsl.components.component
def CurateSchema(schema: InputArtifact[standard_artifacts.Schema],
                 curated: OutputArtifact[standard_artifacts.Schema],
                 task: Parameter[str]):
    """SchemaGen's schema -> the same with the contract's rules for ``task`` (see the module docstring). The artifact
    folders may be URIs: TFDV reads and writes through TensorFlow's file systems."""
    import tensorflow_data_validation as tfdv

    from shaspec_tf import fileio

    inferred = tfdv.load_schema_text(fileio.join(schema.uri, SCHEMA_FILE))
    fileio.makedirs(curated.uri)  # a local pipeline root under Vertex's entrypoint does not create it
    tfdv.write_schema_text(curate_schema(inferred, task), fileio.join(curated.uri, SCHEMA_FILE))
