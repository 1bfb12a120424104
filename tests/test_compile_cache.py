"""The persistent compilation cache (shaspec_tf.compile_cache): where it lives, and that a second process loads
what the first one compiled (JAX) or finds the executables of XLA-compiled functions (TensorFlow). The caches are
switched on in child processes only, so that this test session's own JAX and TensorFlow are left as they were."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from shaspec_tf import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: switch the cache on, compile one small Keras-on-JAX program (a jitted call of keras.ops), and
# report the cache's hits and misses (JAX's monitoring events) and the files in the cache folder.
JAX_CHILD = textwrap.dedent("""
    import json, os, sys
    from shaspec_tf.compile_cache import enable_compile_cache
    folder = enable_compile_cache(sys.argv[1])
    import jax, keras, numpy as np
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    step = jax.jit(lambda x, w: keras.ops.sum(keras.ops.tanh(keras.ops.matmul(x, w)) ** 2))
    value = float(step(np.ones((8, 16), np.float32), np.full((16, 4), 0.1, np.float32)))
    print(json.dumps({"folder": folder, "value": value, "files": sorted(os.listdir(os.path.join(folder, "jax"))),
                      "hits": sum("cache_hits" in e for e in events),
                      "misses": sum("cache_misses" in e for e in events)}))
""")

TF_CHILD = textwrap.dedent("""
    import json, os, sys
    from shaspec_tf.compile_cache import enable_compile_cache
    folder = enable_compile_cache(sys.argv[1])
    import tensorflow as tf
    step = tf.function(lambda x: tf.reduce_sum(tf.tanh(x @ tf.transpose(x))), jit_compile=True)
    value = float(step(tf.ones((8, 16))))
    print(json.dumps({"folder": folder, "value": value, "flags": os.environ["TF_XLA_FLAGS"],
                      "files": sorted(os.listdir(os.path.join(folder, "tensorflow")))}))
""")


def _child(script, folder, backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    for name in ("JAX_COMPILATION_CACHE_DIR", "TF_XLA_FLAGS", compile_cache.CACHE_ENV):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_jax_process_loads_the_program_the_first_compiled(tmp_path):
    first = _child(JAX_CHILD, tmp_path / "cache", "jax")
    assert first["folder"] == str(tmp_path / "cache")
    assert first["files"] and first["misses"] >= 1 and first["hits"] == 0  # compiled, and written to the folder
    second = _child(JAX_CHILD, tmp_path / "cache", "jax")
    assert second["hits"] >= 1 and second["misses"] == 0 and second["value"] == first["value"]
    assert second["files"] == first["files"]  # read, nothing new written


@pytest.mark.tensorflow
def test_tensorflow_keeps_xla_compiled_functions(tmp_path):
    out = _child(TF_CHILD, tmp_path / "cache", "tensorflow")
    assert f"--tf_xla_persistent_cache_directory={tmp_path / 'cache' / 'tensorflow'}" in out["flags"].split()
    assert any(name.startswith("xla_compile_cache") for name in out["files"]), out["files"]


def test_default_folder_environment_and_off_switch(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == str(tmp_path / "xdg" / "shaspec_tf" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "shaspec_tf", "xla")
    monkeypatch.setenv(compile_cache.CACHE_ENV, "~/elsewhere")
    assert compile_cache.default_cache_dir() == os.path.join(os.path.expanduser("~"), "elsewhere")
    for off in ("off", "OFF", "none", "0", "false", " "):
        monkeypatch.setenv(compile_cache.CACHE_ENV, off)
        assert compile_cache.default_cache_dir() is None
        assert compile_cache.enable_compile_cache() is None


def test_tensorflow_flag_joins_the_users_flags_and_keeps_his_folder(monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory=/old")
    assert compile_cache._enable_tensorflow("/new", explicit=False) == "/old"
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory=/old"
    assert compile_cache._enable_tensorflow("/new", explicit=True) == "/new"
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2 --tf_xla_persistent_cache_directory=/new"
    monkeypatch.delenv("TF_XLA_FLAGS")
    compile_cache._enable_tensorflow("/x", explicit=False)
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/x"
