"""Training in a child process: real TensorFlow in the child, none in this test's agent side.

Every test here starts real ``python -m fedprune.edge_agent.train_worker`` processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge_helpers import small_mlp_task, write_digits_npz
from fedprune.edge_agent.budgets import BudgetExceeded, Budgets
from fedprune.edge_agent.child_trainer import ChildProcessTrainer, TrainingChildFailed
from fedprune.edge_agent.inference import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path) -> Path:
    return write_digits_npz(tmp_path / "local.npz", n=300)


def test_a_round_trains_in_a_child_and_installs_its_global_model(tmp_path, data):
    trainer = ChildProcessTrainer(tmp_path / "state", data, budgets=Budgets(max_round_s=300))
    arch, task = small_mlp_task(sparsity=0.8, epochs=2)
    result = trainer.train(arch, task)
    mask = task.masks[0]
    assert [d.shape for d in result.delta] == [tuple(s) for s in arch.shapes]
    assert np.all(result.delta[0][~mask] == 0) and np.any(result.delta[0][mask] != 0)  # trained under the mask
    assert result.metrics["train_peak_rss_mb"] > 300  # TensorFlow was in the child...
    trainer.wait_idle()  # the child exports the global model after the result, then exits
    report = trainer.last_report
    assert report.exit_code == 0 and report.peak_rss_mb >= result.metrics["train_peak_rss_mb"]
    assert report.result_s is not None and report.result_s <= report.wall_s

    installed = trainer.models.current()
    assert installed.round == 1 and installed.precision == "int8" and abs(installed.sparsity - 0.8) < 0.01
    assert installed.runtime.startswith("ai-edge-litert")
    p = Predictor(trainer.models.directory)
    assert p.model_info.sha256 == installed.sha256 and p.predict(np.zeros((1, 8, 8, 1))).shape == (1, 10)
    assert not (tmp_path / "state" / "work" / "model.tflite").exists()  # moved into the store


def test_memory_budget_stops_the_child_then_refuses_without_starting_one(tmp_path, data):
    trainer = ChildProcessTrainer(tmp_path / "state", data, budgets=Budgets(max_train_memory_mb=150))
    arch, task = small_mlp_task()
    with pytest.raises(BudgetExceeded, match="max_train_memory_mb = 150") as first:
        trainer.train(arch, task)  # killed while importing TensorFlow
    assert "reached at least" in str(first.value)
    trainer.wait_idle()
    assert trainer.last_report.exit_code == -9 and trainer.last_report.peak_rss_mb > 150
    start = time.monotonic()
    with pytest.raises(BudgetExceeded, match="measured in an earlier round; not started"):
        trainer.train(arch, task)
    assert time.monotonic() - start < 1.0
    # A larger budget tries again (and the peak it measured is kept across restarts).
    again = ChildProcessTrainer(tmp_path / "state", data, budgets=Budgets(max_train_memory_mb=160))
    assert again.peaks.get(arch.digest) > 150


def test_time_budget_stops_the_child_and_fails_the_round(tmp_path, data):
    trainer = ChildProcessTrainer(tmp_path / "state", data, budgets=Budgets(max_round_s=1.5))
    arch, task = small_mlp_task()
    start = time.monotonic()
    with pytest.raises(BudgetExceeded, match="did not finish within 2 s"):
        trainer.train(arch, task)
    assert time.monotonic() - start < 10
    assert trainer.last_report is None or trainer.last_report.exit_code == -9


def test_an_error_in_the_child_comes_back_as_its_message(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((20, 5, 5, 1), np.float32))  # the labels are missing
    trainer = ChildProcessTrainer(tmp_path / "state", bad, export_precision="off")
    arch, task = small_mlp_task()
    start = time.monotonic()
    with pytest.raises(TrainingChildFailed, match="DataError: .*needs arrays 'x_train' and 'y_train'"):
        trainer.train(arch, task)
    assert time.monotonic() - start < 15  # found before TensorFlow was loaded


def test_the_agent_side_never_imports_tensorflow():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import fedprune.edge_agent.cli, fedprune.edge_agent.agent, fedprune.edge_agent.child_trainer, fedprune.edge_agent.inference
        import fedprune.edge_agent.config, fedprune.edge_agent.model_store, fedprune.edge_agent.jobfiles
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tf_keras", "keras"))
        assert not heavy, heavy
        from fedprune.edge_agent.budgets import peak_rss_mb
        print(int(peak_rss_mb()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 60  # MB
