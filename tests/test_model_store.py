"""The device's model folder: atomic swaps, rollback, and recovery from a crash at every step."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedprune.edge_agent.model_store import ModelInfo, ModelStore, ModelStoreError

ROOT = Path(__file__).resolve().parents[1]


def _model(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _consistent(store: ModelStore) -> None:
    """What every reader may rely on: the manifest names the files that are there."""
    manifest = store.manifest()
    assert manifest["incoming"] is None
    for key, path in (("current", store.current_path), ("previous", store.previous_path)):
        info = manifest[key]
        if info is None:
            continue
        assert path.is_file(), f"{key} in the manifest but {path.name} missing"
        assert _sha(path.read_bytes()) == info.sha256, f"{path.name} is not the manifest's {key}"
    assert not [p.name for p in store.directory.iterdir() if p.name.startswith(".") or p.name == "incoming.tflite"]


def test_install_keeps_the_previous_model_and_rolls_back(tmp_path):
    store = ModelStore(tmp_path / "model", writer=True)
    with pytest.raises(ModelStoreError, match="no model installed"):
        store.read_current()
    with pytest.raises(ModelStoreError, match="no previous model"):
        store.rollback()

    first = store.install(_model(tmp_path, "a.tflite", b"model A"), ModelInfo(1, "int8", 0.5))
    assert (first.size_bytes, first.sha256) == (7, _sha(b"model A"))
    assert store.previous() is None and store.read_current() == (b"model A", first)

    store.install(_model(tmp_path, "b.tflite", b"model B!"), ModelInfo(2, "int8", 0.8))
    assert store.read_current()[0] == b"model B!" and store.current().round == 2
    assert store.previous_path.read_bytes() == b"model A" and store.previous().round == 1
    assert not (tmp_path / "b.tflite").exists()  # moved in, not copied
    _consistent(store)

    back = store.rollback()
    assert back.round == 1 and store.read_current()[0] == b"model A"
    assert store.previous().round == 2  # a second rollback undoes the first
    assert store.rollback().round == 2
    _consistent(store)
    assert ModelStore(tmp_path / "model").current().round == 2  # persisted


def test_only_the_verified_file_is_installed(tmp_path):
    """A file whose sha256 is not the one its verifier recorded is refused; the folder is unchanged."""
    store = ModelStore(tmp_path / "model", writer=True)
    store.install(_model(tmp_path, "a.tflite", b"model A"), ModelInfo(1, "int8", 0.5, sha256=_sha(b"model A")))
    with pytest.raises(ModelStoreError, match="is not the model that was verified"):
        store.install(_model(tmp_path, "b.tflite", b"swapped"), ModelInfo(2, "int8", 0.5, sha256=_sha(b"model B")))
    assert store.read_current()[0] == b"model A" and store.previous() is None
    _consistent(store)


def test_a_replaced_current_file_is_refused_not_run(tmp_path):
    store = ModelStore(tmp_path, writer=True)
    store.install(_model(tmp_path, "a.tflite", b"model A"), ModelInfo(1, "int8", 0.5))
    store.current_path.write_bytes(b"tampered")
    with pytest.raises(ModelStoreError, match="not the model the manifest names"):
        store.read_current(attempts=2)


def _interrupted_at(tmp_path: Path, step: int) -> ModelStore:
    """A store with model A current, whose install of model B stopped after ``step`` (1-4)."""
    folder = tmp_path / f"step{step}"
    store = ModelStore(folder, writer=True)
    store.install(_model(tmp_path, f"a{step}.tflite", b"model A"), ModelInfo(1, "int8", 0.5))
    new = ModelInfo(2, "int8", 0.8, size_bytes=7, sha256=_sha(b"model B"))
    (folder / "incoming.tflite").write_bytes(b"model B")  # step 1
    if step >= 2:
        store._write_manifest(store.current(), store.previous(), new)
    if step >= 3:
        os.link(store.current_path, folder / ".previous.tflite.link")
        os.replace(folder / ".previous.tflite.link", store.previous_path)
    if step >= 4:
        os.replace(folder / "incoming.tflite", store.current_path)
    return store


@pytest.mark.parametrize("step,expected_round", [(1, 1), (2, 2), (3, 2), (4, 2)])
def test_restart_after_a_crash_at_each_step_of_an_install(tmp_path, step, expected_round):
    _interrupted_at(tmp_path, step)
    reopened = ModelStore(tmp_path / f"step{step}", writer=True)  # what the agent does when it starts again
    _consistent(reopened)
    assert reopened.current().round == expected_round
    if expected_round == 2:  # the install was announced: it is finished, A kept for rollback
        assert reopened.read_current()[0] == b"model B" and reopened.previous().round == 1
    else:  # never announced: dropped, A still current
        assert reopened.read_current()[0] == b"model A"


def test_a_reader_never_repairs_or_changes_the_folder(tmp_path):
    """Inference opens the folder while the agent may be mid-install: it must not "recover" it."""
    store = _interrupted_at(tmp_path, 2)
    before = sorted((p.name, p.read_bytes()) for p in store.directory.iterdir())
    reader = ModelStore(store.directory)
    assert reader.read_current()[0] == b"model A" and reader.manifest()["incoming"].round == 2
    assert sorted((p.name, p.read_bytes()) for p in store.directory.iterdir()) == before
    with pytest.raises(ModelStoreError, match="read-only"):
        reader.rollback()
    # Between the rename and the manifest update, the new file is current: the reader says so.
    late = _interrupted_at(tmp_path / "late", 4)
    data, info = ModelStore(late.directory).read_current()
    assert data == b"model B" and info.round == 2


_INSTALL_LOOP = """
import sys, itertools
sys.path.insert(0, {root!r})
from fedprune.edge_agent.model_store import ModelInfo, ModelStore
store = ModelStore({folder!r}, writer=True)
print("ready", flush=True)
for r in itertools.count(1):
    p = store.directory.parent / "new.tflite"
    p.write_bytes(bytes([r % 251]) * (200_000 + r))
    store.install(p, ModelInfo(r, "int8", 0.9))
"""


def test_sigkill_during_installs_leaves_a_consistent_folder(tmp_path):
    folder = tmp_path / "model"
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", _INSTALL_LOOP.format(root=str(ROOT), folder=str(folder))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * attempt)  # at a different point of an install each time
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        store = ModelStore(folder, writer=True)
        _consistent(store)
        if store.current() is not None:
            data, info = store.read_current()
            assert len(data) == 200_000 + info.round
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["current"]["round"] >= 1


def test_model_status_and_rollback_commands(tmp_path):
    store = ModelStore(tmp_path / "state" / "model", writer=True)
    for r, content in ((1, b"model A"), (2, b"model B")):
        store.install(_model(tmp_path, "m.tflite", content), ModelInfo(r, "int8", 0.9))

    def agent(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "model", *args, "--state-dir",
                               str(tmp_path / "state")], capture_output=True, text=True, timeout=60, cwd=ROOT)

    status = agent("status")
    assert status.returncode == 0 and json.loads(status.stdout)["current"]["round"] == 2
    rolled = agent("rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["current"]["round"] == 1
    assert store.read_current()[0] == b"model A"
    empty = subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "model", "rollback", "--state-dir",
                            str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert empty.returncode == 1 and "no model folder" in empty.stderr
