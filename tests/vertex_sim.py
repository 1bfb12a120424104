"""A small stand-in for Vertex AI Pipelines: runs a compiled Kubeflow V2 pipeline spec
(``pipeline/kubeflow_v2_runner.py``) task by task through the same container command lines Vertex would start.

What it does, as Vertex does it:

* reads the ``PipelineJob`` JSON (``pipelineSpec`` + ``runtimeConfig``) and walks ``root.dag.tasks`` in dependency
  order (``dependentTasks`` and the producers of ``taskOutputArtifact`` inputs), for the chosen tasks and everything
  upstream of them;
* for a **container** executor: builds the ``ExecutorInput`` JSON (``inputs.artifacts`` = the upstream outputs with
  their resource ``name``, ``type``, ``uri`` and ``metadata``; ``inputs.parameters`` and ``parameterValues`` = the
  task's constants; ``outputs.artifacts`` = fresh artifacts with URIs
  ``ROOT/PROJECT_NUMBER/JOB_ID/TASK_TASKID/OUTPUT_KEY``; ``outputs.outputFile`` = ``.../executor_output.json``),
  puts it in for the ``{{$}}`` placeholder of the container's ``command`` + ``args``, runs that command line as a
  child process (``python`` = ``sys.executable``: the image's interpreter) with the container's ``env`` over the
  simulator's environment (the JAX Trainer's ``KERAS_BACKEND``), then reads ``executor_output.json`` back
  and takes the output artifacts' metadata (and URIs) from it. An input whose producer gave no artifact (a resolver
  that found none) is left out, which a TFX component reads as an absent optional input;
* for a **resolver** executor: evaluates its ``outputArtifactQueries`` filters against the artifacts this simulator
  recorded (``schema_title``, ``state``, ``name``, ``metadata.KEY.number_value`` / ``string_value`` clauses joined by
  ``AND``; ``{{$.inputs.artifacts['K'].metadata['M']}}`` placeholders), newest match first, as Vertex ML Metadata.

What it does not do: caching (every task runs, as ``enable_caching=False``), conditions, loops, importers, pre-cache
drivers (container ``lifecycle``), placeholders other than ``{{$}}``; any of those in a spec raises
``NotImplementedError`` rather than being skipped. The containers' resource requests (accelerators) are ignored: every
task runs here, on the CPU.

A bucket has no folders to make, and Vertex makes none; with a local pipeline root standing in for one, the simulator
makes each output artifact's folder before the task runs (as the Kubeflow launcher does for local paths).

Paths go through ``shaspec_tf.fileio``, so the pipeline root may be ``gs://...``; this process then needs the Cloud
Storage environment (the tests run it in a child process with the emulator's).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable, Dict, Iterable, List, Optional

from shaspec_tf import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree the image holds at /pipeline
PROJECT_NUMBER = "123456789"
ARTIFACT_PREFIX = f"projects/{PROJECT_NUMBER}/locations/us-central1/metadataStores/default/artifacts/"
_PLACEHOLDER = re.compile(r"\{\{\$[^}]*\}\}")
_INPUT_METADATA = re.compile(r"\{\{\$\.inputs\.artifacts\['([^']+)'\]\.metadata\['([^']+)'\]\}\}")


class TaskFailed(RuntimeError):
    """A task's container exited non-zero: the message names the task and ends with its output's tail."""


def schema_title(artifact_type: dict) -> str:
    """``tfx.Model`` from an artifact type (``schemaTitle``, or the ``title:`` line of an ``instanceSchema``)."""
    if "schemaTitle" in artifact_type:
        return artifact_type["schemaTitle"]
    for line in artifact_type.get("instanceSchema", "").splitlines():
        if line.startswith("title:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"artifact type without a title: {artifact_type}")


def _plain(value: dict):
    """A spec ``Value`` (``{"stringValue": ...}``, ``{"intValue": "3"}``, ``{"doubleValue": 0.5}``) -> Python."""
    (kind, raw), = value.items()
    return {"stringValue": str, "intValue": int, "doubleValue": float}[kind](raw)


class VertexSimulator:
    """One pipeline spec, one pipeline root, and the artifacts recorded across the runs of this object (so a second
    :meth:`run` resolves the first run's blessed model, as Vertex ML Metadata would)."""

    def __init__(self, spec_path: str, pipeline_root: Optional[str] = None, env: Optional[dict] = None,
                 python: str = sys.executable, workdir: Optional[str] = None, task_timeout: int = 900):
        job = json.loads(fileio.read_text(spec_path))
        if "pipelineSpec" not in job:
            raise ValueError(f"{spec_path}: not a PipelineJob (no pipelineSpec)")
        self.spec = job["pipelineSpec"]
        self.root = (pipeline_root or job.get("runtimeConfig", {}).get("gcsOutputDirectory", "")).rstrip("/")
        if not self.root:
            raise ValueError(f"{spec_path}: no pipeline root (runtimeConfig.gcsOutputDirectory); pass pipeline_root")
        # The image puts the source tree on PYTHONPATH (Dockerfile): the TFX app is not installed, and the spec names
        # its modules (components.trainer_module.run_fn, the executors). Here the tree is this repository.
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, **(env or {})}
        self.python = python
        self.workdir = workdir or tempfile.mkdtemp(prefix="vertex-sim-")    # local: logs, working directories
        os.makedirs(self.workdir, exist_ok=True)
        self.task_timeout = task_timeout
        self.store: List[dict] = []            # every artifact written: what the resolvers query
        self.timings: Dict[str, float] = {}

    # -- the DAG -------------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict:
        return self.spec["root"]["dag"]["tasks"]

    def upstream(self, name: str) -> set:
        task = self.tasks[name]
        found = set(task.get("dependentTasks", []))
        for source in task.get("inputs", {}).get("artifacts", {}).values():
            if "taskOutputArtifact" not in source:
                raise NotImplementedError(f"{name}: input {source} is not a task output (not simulated)")
            found.add(source["taskOutputArtifact"]["producerTask"])
        return found

    def order(self, targets: Iterable[str]) -> List[str]:
        """``targets`` and everything upstream of them, each task after its producers."""
        wanted, todo = set(), list(targets)
        while todo:
            name = todo.pop()
            if name not in self.tasks:
                raise KeyError(f"no task {name!r} in the spec; tasks: {', '.join(sorted(self.tasks))}")
            if name not in wanted:
                wanted.add(name)
                todo.extend(self.upstream(name))
        ordered, done = [], set()
        while len(ordered) < len(wanted):
            ready = sorted(n for n in wanted - done if self.upstream(n) <= done)
            if not ready:
                raise ValueError(f"the DAG has a cycle among {sorted(wanted - done)}")
            ordered += ready
            done |= set(ready)
        return ordered

    def branch(self, suffix: str) -> List[str]:
        """Every task of one branch (ids ``Node.<suffix>`` and ``Node.<suffix>-...``), in order."""
        names = [n for n in self.tasks if n.endswith(f".{suffix}") or f".{suffix}-" in n]
        if not names:
            raise KeyError(f"no task of branch {suffix!r} in the spec")
        return self.order(names)

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, targets: Iterable[str], log: Callable[[str], None] = lambda line: None) -> Dict[str, dict]:
        """Run ``targets`` (and what they need) once, as one pipeline job. Returns ``{task: {output key: [runtime
        artifact, ...]}}``; raises :class:`TaskFailed` at the first task that fails."""
        job_id = f"{self.spec['pipelineInfo']['name']}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
        outputs: Dict[str, dict] = {}
        for name in self.order(targets):
            start = time.time()
            task = self.tasks[name]
            component = self.spec["components"][task["componentRef"]["name"]]
            executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]
            if task.get("triggerPolicy") or task.get("iteratorPolicy"):
                raise NotImplementedError(f"{name}: conditions and loops are not simulated")
            inputs = self._input_artifacts(task, outputs)
            if "container" in executor:
                outputs[name] = self._run_container(name, job_id, task, component, executor["container"], inputs)
            elif "resolver" in executor:
                outputs[name] = self._resolve(executor["resolver"], inputs)
            else:
                raise NotImplementedError(f"{name}: executor kind {sorted(executor)} is not simulated")
            self.timings[name] = time.time() - start
            log(f"{name}: {self.timings[name]:.1f} s")
        return outputs

    def _input_artifacts(self, task: dict, outputs: dict) -> Dict[str, list]:
        """Each input key -> the producer's output artifacts; an empty list (a resolver that found nothing) leaves
        the input out, which a TFX component reads as an absent optional input."""
        found = {}
        for key, source in task.get("inputs", {}).get("artifacts", {}).items():
            ref = source["taskOutputArtifact"]
            artifacts = outputs[ref["producerTask"]].get(ref["outputArtifactKey"], [])
            if artifacts:
                found[key] = [dict(a) for a in artifacts]
        return found

    def executor_input(self, name: str, job_id: str, task: dict, component: dict, inputs: dict) -> dict:
        """The ``ExecutorInput`` Vertex hands the container for ``{{$}}``."""
        task_root = fileio.join(self.root, PROJECT_NUMBER, job_id, f"{name}_{uuid.uuid4().int % 10 ** 19}")
        parameters = {}
        for key, source in task.get("inputs", {}).get("parameters", {}).items():
            if "runtimeValue" not in source or "constantValue" not in source["runtimeValue"]:
                raise NotImplementedError(f"{name}: parameter {key} is not a constant (not simulated)")
            parameters[key] = source["runtimeValue"]["constantValue"]
        new = {key: [{"name": ARTIFACT_PREFIX + uuid.uuid4().hex, "type": definition["artifactType"],
                      "uri": fileio.join(task_root, key), "metadata": {}}]
               for key, definition in component.get("outputDefinitions", {}).get("artifacts", {}).items()}
        return {"inputs": {"artifacts": {k: {"artifacts": v} for k, v in inputs.items()},
                           "parameters": parameters,
                           "parameterValues": {k: _plain(v) for k, v in parameters.items()}},
                "outputs": {"artifacts": {k: {"artifacts": v} for k, v in new.items()},
                            "outputFile": fileio.join(task_root, "executor_output.json")}}

    def command_line(self, container: dict, executor_input: dict) -> List[str]:
        """The container's ``command`` + ``args`` with ``{{$}}`` filled in and ``python`` the image's interpreter."""
        line = []
        for part in list(container.get("command", [])) + list(container.get("args", [])):
            part = part.replace("{{$}}", json.dumps(executor_input))
            if _PLACEHOLDER.search(part):
                raise NotImplementedError(f"placeholder {_PLACEHOLDER.search(part).group(0)} is not simulated")
            line.append(part)
        if line and line[0] in ("python", "python3"):
            line[0] = self.python
        return line

    def _run_container(self, name, job_id, task, component, container, inputs) -> dict:
        if container.get("lifecycle"):
            raise NotImplementedError(f"{name}: container lifecycle hooks (pre-cache drivers) are not simulated")
        executor_input = self.executor_input(name, job_id, task, component, inputs)
        if not fileio.is_uri(self.root):
            # A bucket has no folders to make; a local root stands in for one, so its output folders exist up front
            # (as the Kubeflow launcher makes them for local paths). Vertex makes nothing on gs://.
            for listed in executor_input["outputs"]["artifacts"].values():
                fileio.makedirs(listed["artifacts"][0]["uri"])
        line = self.command_line(container, executor_input)
        # The container's working directory is its own, not the repository: imports come from what is installed.
        cwd = tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)
        log_path = os.path.join(self.workdir, f"{name}.log")
        with open(log_path, "wb") as log_file:
            env = {**self.env, **{e["name"]: e["value"] for e in container.get("env", [])}}  # as Vertex starts it
            done = subprocess.run(line, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=self.task_timeout)
        if done.returncode != 0:
            with open(log_path, "rb") as f:
                tail = f.read()[-4000:].decode(errors="replace")
            raise TaskFailed(f"{name} exited with {done.returncode} (log: {log_path}):\n{tail}")
        written = json.loads(fileio.read_text(executor_input["outputs"]["outputFile"]))
        produced = {}
        for key, listed in executor_input["outputs"]["artifacts"].items():
            (artifact,) = listed["artifacts"]
            reported = {a.get("name"): a for a in written.get("artifacts", {}).get(key, {}).get("artifacts", [])}
            update = reported.get(artifact["name"]) or next(iter(reported.values()), {})
            artifact = {**artifact, "uri": update.get("uri", artifact["uri"]),
                        "metadata": dict(update.get("metadata", {}))}
            self.store.append({**artifact, "schema_title": schema_title(artifact["type"]), "state": "LIVE",
                               "created": len(self.store)})
            produced[key] = [artifact]
        return produced

    # -- resolvers -----------------------------------------------------------------------------------------------
    def _resolve(self, resolver: dict, inputs: dict) -> dict:
        resolved = {}
        for key, query in resolver.get("outputArtifactQueries", {}).items():
            resolved[key] = self.query(query["filter"], inputs)
        return resolved

    def query(self, text: str, inputs: Optional[dict] = None) -> List[dict]:
        """The newest recorded artifact that matches a Vertex ML Metadata filter (``[]`` when none does, or when
        the filter reads an input that is absent)."""
        inputs = inputs or {}

        def fill(match):
            listed = inputs.get(match.group(1))
            if not listed:
                raise LookupError
            value = listed[0].get("metadata", {}).get(match.group(2))
            if value is None:
                raise LookupError
            return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)

        try:
            text = _INPUT_METADATA.sub(fill, text)
        except LookupError:
            return []
        if _PLACEHOLDER.search(text):
            raise NotImplementedError(f"resolver placeholder {_PLACEHOLDER.search(text).group(0)} is not simulated")
        clauses = []
        for clause in text.split(" AND "):
            key, _, value = clause.strip().partition("=")
            clauses.append((key.strip(), value.strip().strip('"')))
        for artifact in sorted(self.store, key=lambda a: -a["created"]):
            if all(self._matches(artifact, key, value) for key, value in clauses):
                return [{k: artifact[k] for k in ("name", "type", "uri", "metadata")}]
        return []

    @staticmethod
    def _matches(artifact: dict, key: str, value: str) -> bool:
        if key in ("schema_title", "state", "name", "uri"):
            return str(artifact[key]) == value
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "metadata":
            held = artifact["metadata"].get(parts[1])
            if parts[2] == "number_value":
                return isinstance(held, (int, float)) and float(held) == float(value)
            if parts[2] == "string_value":
                return isinstance(held, str) and held == value
        raise NotImplementedError(f"filter clause {key}={value} is not simulated")
