"""shaspec_tf.fileio: ownership markers, atomic writes and stale-partial cleanup."""
import json
import os
import subprocess
import sys

import pytest

from shaspec_tf import fileio


def _build(target, files, kind="k"):
    staging = fileio.staging_dir(str(target))
    for name, text in files.items():
        path = os.path.join(staging, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    fileio.replace_dir(staging, str(target), kind)


def test_a_user_folder_with_a_manifest_is_never_replaced(tmp_path):
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "manifest.json").write_text("{}")
    (user / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not written by shaspec"):
        _build(user, {"a.txt": "x"})
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(os.listdir(user)) == ["manifest.json", "src", "thesis.tex"]
    assert [p for p in os.listdir(tmp_path) if p != "project"] == []  # the staging folder is gone too


def test_our_output_is_replaced_and_a_foreign_file_makes_it_theirs(tmp_path):
    out = tmp_path / "out"
    _build(out, {"a/1.txt": "one"})
    marker = json.loads((out / fileio.MARKER).read_text())
    assert marker["kind"] == "k" and marker["files"] == {"a/1.txt": 3}
    _build(out, {"b.txt": "two"})
    assert sorted(os.listdir(out)) == [fileio.MARKER, "b.txt"]
    assert os.listdir(tmp_path) == ["out"]  # no .old- or .partial- sibling left

    (out / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md"):
        _build(out, {"c.txt": "three"})
    assert (out / "notes.md").read_text() == "mine" and (out / "b.txt").read_text() == "two"


def test_a_staging_folder_inside_an_output_is_not_foreign(tmp_path):
    out = tmp_path / "out"
    _build(out, {"a.txt": "one"})
    inner = fileio.staging_dir(str(out / "case"))  # e.g. a case being rewritten inside the output
    with open(os.path.join(inner, "x"), "w") as f:
        f.write("partial")
    assert fileio.ensure_replaceable(str(out), "k") is True


def test_a_changed_file_or_another_kind_is_refused(tmp_path):
    out = tmp_path / "out"
    _build(out, {"a.txt": "one"})
    with pytest.raises(FileExistsError, match="not a 'other'"):
        fileio.ensure_replaceable(str(out), "other")
    (out / "a.txt").write_text("edited by hand")
    with pytest.raises(FileExistsError, match="changed"):
        fileio.ensure_replaceable(str(out), "k")
    assert fileio.ensure_replaceable(str(out), "k", check_sizes=False) is True


def test_files_and_empty_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        fileio.ensure_replaceable(str(tmp_path / "file"), "k")
    (tmp_path / "empty").mkdir()
    assert fileio.ensure_replaceable(str(tmp_path / "empty"), "k") is False
    assert fileio.ensure_replaceable(str(tmp_path / "absent"), "k") is False
    _build(tmp_path / "empty", {"a.txt": "x"})
    assert (tmp_path / "empty" / "a.txt").read_text() == "x"


def test_a_marker_that_is_not_ours_is_not_trusted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.bin").write_text("user data")
    (out / fileio.MARKER).write_text(json.dumps({"kind": "k", "files": {"data.bin": 9}}))  # no schema
    with pytest.raises(FileExistsError):
        fileio.ensure_replaceable(str(out), "k")
    (out / fileio.MARKER).write_text("not json")
    with pytest.raises(FileExistsError):
        fileio.ensure_replaceable(str(out), "k")


def test_legacy_outputs_can_be_vouched_for(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    assert fileio.ensure_replaceable(str(out), "k", legacy=lambda folder: True) is True
    with pytest.raises(FileExistsError):
        fileio.ensure_replaceable(str(out), "k", legacy=lambda folder: False)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "x.json"
    fileio.atomic_write(str(target), "old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with fileio.atomic_path(str(target), suffix=".json") as tmp:
            assert tmp.endswith(".json") and os.path.basename(tmp).startswith(".x.json.partial-")
            with open(tmp, "w") as f:
                f.write("half")
            raise Boom()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.json"]
    fileio.atomic_write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_a_killed_writer_leaves_litter_that_only_the_dead_process_loses(tmp_path):
    target = tmp_path / "out"
    # A writer that is SIGKILLed after creating its partial folder.
    code = ("import os, signal, sys; sys.path.insert(0, %r); from shaspec_tf import fileio; "
            "fileio.staging_dir(%r); os.kill(os.getpid(), signal.SIGKILL)") % (
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(fileio.__file__)))), str(target))
    assert subprocess.run([sys.executable, "-c", code]).returncode != 0
    dead = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert len(dead) == 1
    live = fileio.partial_name(str(target))           # ours, alive: must survive the cleanup
    os.mkdir(live)
    other = tmp_path / ".out.partial-otherhost-1-abcdef12"  # another machine's: not ours to judge
    other.mkdir()
    user = tmp_path / ".out.partial-notes"            # a user's file that merely looks alike
    user.write_text("x")
    removed = fileio.clean_stale(str(target))
    assert [os.path.basename(p) for p in removed] == dead
    assert os.path.isdir(live) and other.is_dir() and user.exists()


def test_same_file(tmp_path):
    a = tmp_path / "a.nii"
    a.write_text("x")
    os.symlink(a, tmp_path / "link.nii")
    assert fileio.same_file(str(a), str(tmp_path / "link.nii"))
    assert fileio.same_file(str(a), str(tmp_path / "sub" / ".." / "a.nii"))
    assert not fileio.same_file(str(a), str(tmp_path / "b.nii"))


def test_clean_stale_in_a_folder_takes_every_dead_name_and_nothing_else(tmp_path):
    code = ("import os, signal, sys; sys.path.insert(0, %r); from shaspec_tf import fileio; "
            "[open(fileio.partial_name(os.path.join(%r, n)), 'w').close() for n in ('a.json', 'b.h5')]; "
            "os.kill(os.getpid(), signal.SIGKILL)") % (
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(fileio.__file__)))), str(tmp_path))
    assert subprocess.run([sys.executable, "-c", code]).returncode != 0
    dead = sorted(p for p in os.listdir(tmp_path) if ".partial-" in p)
    assert len(dead) == 2
    live = fileio.partial_name(str(tmp_path / "c.npz"))
    open(live, "w").close()
    (tmp_path / "kept.txt").write_text("x")
    removed = fileio.clean_stale_in(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == dead
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), "kept.txt"])
    assert fileio.clean_stale_in(str(tmp_path / "absent")) == []

