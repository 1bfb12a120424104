# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create the virtual environment in .venv from nothing when it is absent (scripts/bootstrap.sh).
PY := .venv/bin/python
MODEL_TESTS := tests/test_layers.py tests/test_losses.py tests/test_models.py tests/test_convert.py tests/test_inference.py \
               tests/test_remat.py

.PHONY: venv demo test test-tf test-jax

venv:
	@bash scripts/bootstrap.sh

# The main job: the TFX pipeline on the embedded default (phantom BraTS + the real AV-MNIST), LocalDagRunner.
demo: venv
	.venv/bin/python pipeline/local_runner.py

# The whole suite under TensorFlow, then the model library again under KERAS_BACKEND=jax. Both passes run in two
# worker processes (pytest-xdist), a test file to a worker: much of the TensorFlow pass waits on child processes
# (Beam, TFX's entrypoints, the Cloud Storage emulator, servers), and the JAX pass is mostly XLA compilations, one
# core each (6 min 23 s in one process, 4 min 6 s in two), so two keep a 2-core machine busy. Each pass ends by
# listing its slowest tests (--durations), so a CI log shows where the 30-minute budget goes.
test: venv
	$(MAKE) --no-print-directory test-tf test-jax

test-tf:
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test-jax:
	KERAS_BACKEND=jax $(PY) -m pytest -q -n 2 --dist loadfile -m "not tensorflow" --durations=10 $(MODEL_TESTS)
