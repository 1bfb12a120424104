# The image every step of the Kubeflow Pipelines v2 / Vertex AI pipeline runs in (pipeline/kubeflow_v2_runner.py,
# SHASPEC_IMAGE): this repository installed with the same pinned set as .venv. Not built by the test suite (no Docker
# there); tests/test_packaging.py checks what can be checked without it.
#
#   docker build -t IMAGE .                               CPU
#   docker build --build-arg VARIANT=gpu -t IMAGE .       GPU: TensorFlow 2.16's CUDA 12.3 / cuDNN 8.9 wheels
#   docker build --build-arg VARIANT=jax-gpu -t IMAGE .   GPU for the JAX Trainer (kubeflow_v2_runner.py
#                                                         --trainer-backend jax): jax[cuda12] (cuDNN 9, pinned in
#                                                         constraints-jax-gpu.txt) beside TensorFlow, which runs on
#                                                         the CPU there (its CUDA wheels want cuDNN 8.9: pip cannot
#                                                         install both). KERAS_BACKEND is not set in the image: the
#                                                         compiled spec starts the Trainer alone with KERAS_BACKEND=jax,
#                                                         every other step keeps TensorFlow.
#
# `tfx pipeline create --engine vertex --build_image` builds this file from the repository root (CPU: TFX passes no
# build arguments) and pushes it to SHASPEC_IMAGE.
FROM python:3.10-slim

ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /pipeline
COPY . .
# g++ only while installing: pyfarmhash (from tensorflow-data-validation) has no Linux wheel and is compiled.
RUN case "$VARIANT" in \
        cpu) cuda="" ;; \
        gpu) cuda="tensorflow[and-cuda]==2.16.2" ;; \
        jax-gpu) cuda="jax[cuda12]==0.4.30 -c constraints-jax-gpu.txt" ;; \
        *) echo "VARIANT must be cpu, gpu or jax-gpu, got '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && apt-get update && apt-get install -y --no-install-recommends g++ \
    && pip install -c constraints.txt ".[pipeline,serving]" $cuda \
    && apt-get purge -y --auto-remove g++ && rm -rf /var/lib/apt/lists/*
# The components' executors, the Trainer's run_fn (components.trainer_module.run_fn) and the pipeline are named by
# module path in the compiled spec: importable from /pipeline whatever the working directory.
ENV PYTHONPATH=/pipeline
# What the compiled spec runs in every step (Vertex AI passes the arguments); `docker run IMAGE --help` shows them.
ENTRYPOINT ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]
