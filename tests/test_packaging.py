"""Packaging: what ``pip install .`` declares against what the code imports, the pinned set the image installs,
and the Dockerfile / .dockerignore (no Docker here: checked as text, and the image's entrypoint module imported).

A fresh ``pip install .`` without constraints must be able to run ``shaspec predict``: rather than a slow full install,
the wheel is built (``pip wheel --no-deps``, offline) and its ``Requires-Dist`` must name a distribution for every
third-party import of the library; the rest of the check uses the metadata of the packages installed in .venv.
"""
import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = ("pipeline", "components", "shaspec_serving")
OURS = ("shaspec_tf",) + APPS
ENTRYPOINT = ["python", "-m", "tfx.orchestration.kubeflow.v2.container.kubeflow_v2_run_executor"]
# Imports of the library that the base install leaves out, each with the extra that brings it (None: none does) and
# why. Everything else it imports, at module level or in any function, must be in install_requires.
OPTIONAL = {
    "apache_beam": ("pipeline", "`shaspec prepare brats` and the pipeline's example gens run Apache Beam"),
    "nilearn": ("pipeline", "`shaspec prepare phantom`: the MNI152 anatomy, a one-line error names the extra; "
                            "`shaspec evaluate`'s overlays, skipped with a one-line note without it"),
    "tensorflow_io": ("pipeline", "AV-MNIST audio other than 16-bit WAV at 8 kHz; a one-line error names the extra"),
    "google_crc32c": ("pipeline", "the checksums of the BraTS Beam writer's TFRecords (with apache-beam[gcp])"),
    "distributed": ("pipeline", "`shaspec prepare brats --runner DaskRunner` (apache-beam[dask]); one-line error"),
    "grpc": ("serving", "`shaspec predict --server` over gRPC"),
    "tensorflow_serving": ("serving", "`shaspec predict --server`: TF Serving's request protos"),
    "google.protobuf": ("serving", "`shaspec predict --server`: reading TF Serving's replies"),
    "jax": ("test", "only under KERAS_BACKEND=jax, which the caller chose and installed"),
    "torch": (None, "only to read the official PyTorch .pth weights; a .npz of them needs nothing (README)"),
}


# ----------------------------------------------------------------------------------------------- the code's imports
def _imports(package: str):
    """``{import name: "module" | "function"}`` of every absolute third-party import under ``package``: ``google.x``
    keeps two parts (a namespace shared by many distributions), others their first; "module" wins."""
    found = {}

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            for name in names:
                parts = name.split(".")
                top = ".".join(parts[:2]) if parts[0] == "google" else parts[0]
                if parts[0] not in sys.stdlib_module_names and parts[0] not in OURS and parts[0] != "__future__":
                    where = "function" if inner else "module"
                    found[top] = "module" if "module" in (found.get(top), where) else where
            visit(child, inner)

    for folder, dirs, files in os.walk(os.path.join(REPO, package)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    visit(ast.parse(f.read()), 0)
    return found


def _owners():
    """``{module name: {distribution}}`` from every installed distribution's files (``packages_distributions`` of
    Python 3.10 reads only ``top_level.txt``, which numpy, scipy, matplotlib and nibabel do not ship)."""
    owners = {}
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) or parts[0] in ("..", "bin"):
                continue
            stems = [parts[0].split(".")[0]] if len(parts) == 1 else [parts[0], ".".join(parts[:2]).split(".py")[0]]
            for stem in stems:
                owners.setdefault(stem, set()).add(name)
    return owners


@pytest.fixture(scope="module")
def owners():
    return _owners()


# ------------------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip install .`` would install, built offline from a copy of the sources (no build isolation: the
    venv's setuptools) so that nothing is written into the repository: ``(metadata, entry_points, file names)``."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for package in OURS:
        shutil.copytree(os.path.join(REPO, package), src / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("shaspec_tf-*.whl")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(info).decode())
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    return metadata, entry_points, names


def _declared(metadata):
    """``{extra ("" for the base install): {distribution: Requirement}}`` from the wheel's ``Requires-Dist``."""
    out = {"": {}}
    for extra in metadata.get_all("Provides-Extra") or []:
        out[extra] = {}
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extra = next((e for e in out if e and req.marker and req.marker.evaluate({"extra": e})), "")
        out[extra][canonicalize_name(req.name)] = req
    return out


def _covered(name, owners, declared):
    return bool(owners.get(name, set()) & set(declared))


def test_the_library_declares_every_package_it_imports(wheel, owners):
    declared = _declared(wheel[0])
    imports = _imports("shaspec_tf")
    assert {"keras", "numpy", "scipy", "nibabel", "tensorflow"} <= set(imports)   # the scan sees the code
    missing = {}
    for name, where in sorted(imports.items()):
        if _covered(name, owners, declared[""]) or (where == "function" and OPTIONAL.get(name, ("",))[0] is None):
            continue
        if where == "module":
            missing[name] = "imported at module level: the base install must have it"
        elif name not in OPTIONAL:
            missing[name] = "imported in a function and in no extra of OPTIONAL"
        else:
            extra = OPTIONAL[name][0]
            if extra not in declared or not _covered(name, owners, _closure(declared[extra].values(), extra)):
                missing[name] = f"said to come with the {extra!r} extra, which does not bring it"
    assert not missing, missing
    stale = [name for name in OPTIONAL if name not in imports]
    assert not stale, f"OPTIONAL names imports the library no longer has: {stale}"


def _closure(requirements, extra=""):
    """Every installed distribution ``requirements`` (of the wheel's ``extra``) pull in, markers evaluated for this
    interpreter, each version checked against what asks for it: ``{name: version}``."""
    seen, todo = {}, [(req, extra) for req in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        version = md.version(name)
        assert req.specifier.contains(version, prereleases=True), f"{name} {version} does not satisfy {req}"
        if name in seen and not req.extras:
            continue
        seen[name] = version
        for line in md.requires(name) or []:
            todo += [(Requirement(line), e) for e in ("", *req.extras)]
    return seen


def test_the_apps_imports_come_with_their_extras(wheel, owners):
    """shaspec_serving/ holds the ``shaspec`` program: its module-level imports must be in the base install.
    pipeline/ and components/ run with the ``pipeline`` extra, whose dependencies (TFX's own among them) cover what
    they import."""
    declared = _declared(wheel[0])
    base = set(_closure(declared[""].values()))
    for package, extras in (("shaspec_serving", ("serving",)), ("pipeline", ("pipeline",)),
                             ("components", ("pipeline",))):
        reach = base.union(*[_closure(declared[e].values(), e) for e in extras])
        for name, where in _imports(package).items():
            pool = base if (package == "shaspec_serving" and where == "module") else reach
            assert owners.get(name, set()) & pool, f"{package} imports {name} ({where} level), not in {extras}"


def test_the_wheel_ships_the_library_and_the_program_under_the_projects_names(wheel):
    """``pip install shaspec-tf`` adds two top-level packages, both the project's (``shaspec_tf``, ``shaspec_serving``):
    no generic name like ``pipeline`` or ``serving``. The TFX app (pipeline/, components/) is not installed; it runs
    from the source tree, as TFX's templates do (the image puts /pipeline on PYTHONPATH, see the Dockerfile test)."""
    metadata, entry_points, names = wheel
    with open(os.path.join(REPO, "shaspec_tf", "__init__.py"), encoding="utf-8") as f:
        assert metadata["Version"] == re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    script = re.search(r"^shaspec\s*=\s*([\w.]+):(\w+)$", entry_points, re.M)
    assert script, entry_points
    module = script.group(1).replace(".", "/") + ".py"
    for path in (module, "shaspec_tf/__init__.py", "shaspec_tf/cli.py", "shaspec_serving/server.py",
                 "shaspec_serving/README.md", "shaspec_serving/models.config"):
        assert path in names, path
    tops = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"shaspec_tf", "shaspec_serving"}, tops


# ----------------------------------------------------------------------------------- the pinned set and the image
def _pins(name="constraints.txt"):
    pins = {}
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_everything_the_image_installs(wheel):
    """``pip install -c constraints.txt ".[pipeline,serving]"`` (the Dockerfile) must resolve nothing unpinned: every
    distribution it pulls in is pinned, at the version .venv holds; the GPU variant adds only TensorFlow's exact
    CUDA pins."""
    declared, pins = _declared(wheel[0]), _pins()
    wanted = {}
    for extra in ("", "pipeline", "serving"):
        wanted.update(_closure(declared[extra].values(), extra))
    unpinned = sorted(set(wanted) - set(pins))
    assert not unpinned, f"not in constraints.txt: {unpinned}"
    assert {n: v for n, v in wanted.items() if pins[n] != v} == {}
    cuda = [Requirement(line) for line in md.requires("tensorflow") if "and-cuda" in line]
    assert cuda and all(str(r.specifier).startswith("==") for r in cuda), cuda


def _dockerfile():
    with open(os.path.join(REPO, "Dockerfile"), encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.slow
@pytest.mark.tensorflow
def test_dockerfile_installs_the_pinned_set_and_runs_the_kubeflow_v2_executor():
    lines = _dockerfile()
    pins = _pins()
    assert lines[0] == "FROM python:3.10-slim"
    with open(os.path.join(REPO, ".python-version"), encoding="utf-8") as f:
        assert lines[0].endswith(f"python:{f.read().strip()}-slim")
    run = " ".join(line for line in lines if line.startswith("RUN "))
    assert 'pip install -c constraints.txt ".[pipeline,serving]"' in run
    assert f'cuda="tensorflow[and-cuda]=={pins["tensorflow"]}"' in run     # the GPU variant, at the pinned version
    assert "COPY . ." in lines and "ENV PYTHONPATH=/pipeline" in lines and "WORKDIR /pipeline" in lines
    (entrypoint,) = [json.loads(line[len("ENTRYPOINT"):]) for line in lines if line.startswith("ENTRYPOINT")]
    assert entrypoint == ENTRYPOINT
    # The module imports, and it is the command the compiled spec gives every step (a child process: importing it
    # imports TensorFlow Model Analysis, which sets TF_USE_LEGACY_KERAS in the environment).
    code = ("import importlib, json; importlib.import_module('tfx.orchestration.kubeflow.v2.container."
            "kubeflow_v2_run_executor'); from tfx.orchestration.kubeflow.v2 import kubeflow_v2_dag_runner as r; "
            "print(json.dumps(list(r.KubeflowV2DagRunnerConfig(default_image='x').default_commands)))")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ENTRYPOINT


def test_the_jax_gpu_variant_adds_pinned_jax_cuda_and_leaves_the_backend_to_the_spec():
    """``VARIANT=jax-gpu``: jax[cuda12] at constraints.txt's jax, its CUDA wheels pinned in constraints-jax-gpu.txt
    (which only adds to constraints.txt), a cuDNN major that TensorFlow's [and-cuda] pins cannot share (so not
    with VARIANT=gpu), and no image-wide KERAS_BACKEND: the compiled spec sets it on the Trainer alone."""
    lines, pins, added = _dockerfile(), _pins(), _pins("constraints-jax-gpu.txt")
    run = " ".join(line for line in lines if line.startswith("RUN "))
    assert f'jax-gpu) cuda="jax[cuda12]=={pins["jax"]} -c constraints-jax-gpu.txt" ;;' in run
    assert "VARIANT must be cpu, gpu or jax-gpu" in run
    assert pins["jax"] == pins["jaxlib"] == added["jax-cuda12-plugin"] == added["jax-cuda12-pjrt"]
    assert set(added) & set(pins) == set()
    assert all(name.startswith(("jax-cuda12-", "nvidia-")) for name in added), sorted(added)
    (tf_cudnn,) = [Requirement(line) for line in md.requires("tensorflow")
                   if "and-cuda" in line and canonicalize_name(Requirement(line).name) == "nvidia-cudnn-cu12"]
    assert str(tf_cudnn.specifier).startswith("==8.") and added["nvidia-cudnn-cu12"].startswith("9.")
    assert not [line for line in lines if "KERAS_BACKEND" in line]


def _docker_pattern(pattern: str):
    """A ``.dockerignore`` pattern as Docker reads it: ``*`` and ``?`` within one path part, ``**`` across parts."""
    out, i, pattern = "", 0, pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(out)


def _ignored(path: str, patterns) -> bool:
    """Whether Docker leaves ``path`` (relative, ``/``-separated) out of the build context: some pattern matches the
    path or a folder above it (no ``!`` exceptions are used)."""
    parts = path.split("/")
    return any(_docker_pattern(p).fullmatch("/".join(parts[:i])) for p in patterns for i in range(1, len(parts) + 1))


def test_dockerignore_keeps_what_the_build_needs_and_drops_environments_and_outputs():
    with open(os.path.join(REPO, ".dockerignore"), encoding="utf-8") as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")]
    needed = ["setup.py", "pyproject.toml", "README.md", "constraints.txt", "constraints-jax-gpu.txt"]
    for package in OURS:
        for folder, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            needed += [os.path.relpath(os.path.join(folder, n), REPO).replace(os.sep, "/") for n in files
                       if not n.endswith(".pyc")]
    assert [p for p in needed if _ignored(p, patterns)] == []
    for dropped in (".git/config", ".venv/bin/python", "shaspec_tf/__pycache__/cli.cpython-310.pyc",
                    "shaspec_pipeline/metadata.db", "shaspec_tf.egg-info/PKG-INFO", "tests/test_cli.py",
                    "build/lib/setup.py"):
        assert _ignored(dropped, patterns), dropped
