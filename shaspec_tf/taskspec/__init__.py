"""What a task is, at the bottom of the library: its constants (``constants``) and the registry that looks tasks up
by name or kind (``registry``); neither imports anything of the library. The data, metrics, inference, evaluation and
export modules read these; the task classes that call into those modules live above them, in
:mod:`shaspec_tf.tasks`, which registers the built-in tasks (``import shaspec_tf`` imports it)."""
