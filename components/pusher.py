"""TFX's Pusher with one change: a model already in the serving folder is not pushed again.

The standard Pusher copies a blessed model into ``base_directory/<unix time>`` every time it runs, so re-running a
pipeline whose Trainer was cached (the evaluator re-runs once a blessing exists) would serve the same model under a
second version. Here a version whose SavedModel fingerprint (``fingerprint.pb``, written by TensorFlow with every
SavedModel) equals the candidate's counts as the push: the ``PushedModel`` artifact records that version.
"""
from tfx import v1 as tfx
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.components.base import executor_spec
from tfx.types import artifact_utils, standard_component_specs
from tfx.utils import io_utils, proto_utils

from shaspec_tf import fileio

FINGERPRINT = "fingerprint.pb"


def _read(path: str):
    return fileio.read_bytes(path) if fileio.isfile(path) else None


def pushed_version_of(model_path: str, base_directory: str):
    """The version folder under ``base_directory`` that holds the SavedModel at ``model_path``, or None (either may
    be a URI)."""
    mine = _read(fileio.join(model_path, FINGERPRINT))
    if mine is None or not fileio.isdir(base_directory):
        return None
    for name in sorted(fileio.listdir(base_directory), reverse=True):
        if name.isascii() and name.isdigit() and _read(fileio.join(base_directory, name, FINGERPRINT)) == mine:
            return name
    return None


class IdempotentPusherExecutor(pusher_executor.Executor):
    def Do(self, input_dict, output_dict, exec_properties) -> None:
        if self.CheckBlessing(input_dict):
            destination = tfx.proto.PushDestination()
            proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY], destination)
            if destination.WhichOneof("destination") == "filesystem":
                base = destination.filesystem.base_directory
                model_path = self.GetModelPath(input_dict)
                version = pushed_version_of(model_path, base)
                if version is not None:
                    model_push = artifact_utils.get_single_instance(
                        output_dict[standard_component_specs.PUSHED_MODEL_KEY])
                    io_utils.copy_dir(model_path, model_push.uri)
                    self._MarkPushed(model_push, pushed_destination=fileio.join(base, version),
                                     pushed_version=version)
                    return
        super().Do(input_dict, output_dict, exec_properties)


class Pusher(tfx.components.Pusher):
    """``tfx.components.Pusher`` that skips a model already pushed (see the module docstring)."""

    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(IdempotentPusherExecutor)
