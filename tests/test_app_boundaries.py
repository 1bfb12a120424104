"""Package boundaries: the library (``shaspec_tf``) never imports the applications built on it (``shaspec_serving``,
``components``, ``pipeline``), by any route; no module imports another module's private names; the model library is
Keras-only."""
import ast
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = ("shaspec_serving", "components", "pipeline")
# Private names still imported across modules (none left: keep it that way).
KNOWN_PRIVATE_IMPORTS = set()


def _sources(*packages):
    for package in packages:
        for folder, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path, encoding="utf-8") as f:
                        yield os.path.relpath(path, REPO), ast.parse(f.read(), path)


def _imported_modules(tree):
    """``(line, absolute module name)`` of every import statement (relative imports are within the package)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_the_library_imports_no_app_package_and_nothing_by_name():
    found = []
    for path, tree in _sources("shaspec_tf"):
        for line, module in _imported_modules(tree):
            top = module.split(".")[0]
            if top in APPS:
                found.append(f"{path}:{line}: imports {module}")
            if top == "importlib" and module not in ("importlib.metadata", "importlib.resources"):
                found.append(f"{path}:{line}: imports {module} (import by name)")
        for node in ast.walk(tree):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in ("__import__", "import_module"):
                found.append(f"{path}:{node.lineno}: uses {name} (import by name)")
    assert not found, "\n".join(found)


def test_no_module_imports_another_modules_private_names():
    found = []
    for path, tree in _sources("shaspec_tf", *APPS):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and (path, alias.name) not in KNOWN_PRIVATE_IMPORTS:
                        found.append(f"{path}:{node.lineno}: from {'.' * node.level}{node.module} import "
                                     f"{alias.name}")
    assert not found, "\n".join(found)


def test_layers_and_models_use_keras_only():
    found = []
    for path, tree in _sources("shaspec_tf/layers", "shaspec_tf/models"):
        for line, module in _imported_modules(tree):
            if module.split(".")[0] in ("tensorflow", "jax", "torch"):
                found.append(f"{path}:{line}: imports {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("tf", "jnp"):
                found.append(f"{path}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_running_the_library_cli_loads_no_app_package():
    probe = ("import json, sys\n"
             "from shaspec_tf import cli, serving_client, logs\n"
             "status = cli.main(['serve', '--model-base', 'nowhere'])\n"
             f"print(json.dumps([status, sorted({{m.split('.')[0] for m in sys.modules}} & {set(APPS)!r})]))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [2, []]
    assert "serving app" in done.stderr


@pytest.mark.tensorflow
def test_the_app_reexports_the_librarys_serving_client():
    import shaspec_serving.client
    import shaspec_tf.serving_client as library

    for name in shaspec_serving.client.__all__:
        assert getattr(shaspec_serving.client, name) is getattr(library, name), name
