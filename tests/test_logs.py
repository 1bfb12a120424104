"""Quiet logs by default (``shaspec_tf.logs``, ``pipeline/local_runner.py``), everything with ``--verbose``."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_CXX_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ", re.M)  # TensorFlow's C++ log format

PROBE = """
import json, logging, os, subprocess, sys
sys.path.insert(0, {repo!r})
from pipeline.local_runner import configure_logging
configure_logging({verbose})
assert "tensorflow" not in sys.modules  # configuring the log imports no TensorFlow
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"],
                       capture_output=True, text=True).stdout.strip()  # what Beam's workers inherit
if {import_tf}:
    import tensorflow as tf  # reads TF_CPP_MIN_LOG_LEVEL; on a CPU machine, logs the cuDNN factory errors
    tf.constant(1.0) + 1
print(json.dumps({{"child": child, "levels": {{name: logging.getLogger(name).getEffectiveLevel()
                                              for name in ("absl", "apache_beam", "tfx")}}}}))
"""


def _probe(verbose: bool, import_tf: bool, **env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONWARNINGS", "SHASPEC_VERBOSE")}
    done = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO, verbose=verbose, import_tf=import_tf)],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(clean, **env))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.tensorflow
def test_the_local_runner_is_quiet_by_default_here_and_in_its_worker_processes():
    result, stderr = _probe(verbose=False, import_tf=True)
    assert not TF_CXX_LINE.search(stderr), stderr  # no "E external/local_xla/... Unable to register cuDNN factory"
    assert "FutureWarning" not in stderr, stderr
    assert result["child"] == "3"  # Beam's worker processes start just as quiet
    assert result["levels"] == {"absl": 40, "apache_beam": 40, "tfx": 40}  # ERROR


def test_verbose_shows_everything_and_a_users_own_level_is_kept():
    result, _ = _probe(verbose=True, import_tf=False)
    assert result["child"] == "0" and result["levels"] == {"absl": 30, "apache_beam": 30, "tfx": 30}  # WARNING
    result, _ = _probe(verbose=False, import_tf=False, TF_CPP_MIN_LOG_LEVEL="1")
    assert result["child"] == "1"


def test_verbose_defaults_to_the_environment(monkeypatch):
    from shaspec_tf import logs

    for value, expected in (("", False), ("0", False), ("false", False), ("1", True), ("yes", True)):
        monkeypatch.setenv(logs.VERBOSE_ENV, value)
        assert logs.verbose_default() is expected, value
