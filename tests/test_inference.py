"""Inference on the device: Predictor and ``fedprune-agent predict`` on real sparse TFLite files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_helpers import digits_arrays, small_mlp_task
from fedprune.edge_agent.inference import InputError, Predictor, load_inputs
from fedprune.edge_agent.model_store import ModelInfo, ModelStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The small digits MLP (80 % sparse) as Keras, sparse float32 and sparse int8 TFLite files."""
    from fedprune.converters.tflite_export import export_sparse_tflite
    from fedprune.architecture import model_from_architecture_json
    from fedprune.models import set_layer_weights

    arch, task = small_mlp_task(sparsity=0.8)
    model = model_from_architecture_json(arch.model_json)
    set_layer_weights(model, task.weights)
    x, y = digits_arrays(200)
    folder = tmp_path_factory.mktemp("tflite")
    files = {p: export_sparse_tflite(model, folder / f"{p}.tflite", p, representative_x=x).path
             for p in ("float32", "int8")}
    return model, files, x


def test_predictor_matches_keras_and_says_what_ran(exported):
    model, files, x = exported
    keras_logits = model.predict(x, verbose=0)
    fp32 = Predictor(files["float32"])
    assert fp32.runtime.startswith("ai-edge-litert") and fp32.delegates == "default delegates"
    np.testing.assert_allclose(fp32.predict(x), keras_logits, atol=1e-4)
    assert fp32.model_info is None  # a plain file, no manifest

    int8 = Predictor(files["int8"])  # LiteRT's XNNPACK refuses sparse int8 FULLY_CONNECTED
    assert int8.delegates == "builtin ops, no default delegates"
    classes, probabilities = int8.classify(x)
    assert np.mean(classes == keras_logits.argmax(-1)) > 0.9
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    assert int8.latency_ms(x, repeats=5) > 0


def test_runtime_order_falls_back_to_tensorflow(exported):
    _, files, x = exported
    tf_run = Predictor(files["int8"], runtimes=("tflite_runtime", "tensorflow"))  # no tflite-runtime here
    assert tf_run.runtime.startswith("tensorflow")
    lite = Predictor(files["int8"])
    a, b = tf_run.predict(x[:50]), lite.predict(x[:50])  # int8 kernels may round one step apart
    assert np.abs(a - b).max() < 0.2 * np.abs(b).max() and np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.95
    with pytest.raises(RuntimeError, match="no TFLite runtime"):
        Predictor(files["int8"], runtimes=("tflite_runtime",))


def test_predictor_follows_the_model_folder_and_reloads_after_a_swap(exported, tmp_path):
    _, files, x = exported
    store = ModelStore(tmp_path / "model", writer=True)
    for round_, precision in ((1, "float32"), (2, "int8")):
        copy = tmp_path / f"{precision}.tflite"
        copy.write_bytes(files[precision].read_bytes())
        if round_ == 1:
            store.install(copy, ModelInfo(round_, precision, 0.8))
            p = Predictor(store.directory)
            assert p.model_info.round == 1 and not p.reload_if_changed()
        else:
            store.install(copy, ModelInfo(round_, precision, 0.8))
    assert p.reload_if_changed() and p.model_info.round == 2
    assert p.delegates == "builtin ops, no default delegates"
    store.rollback()
    assert p.reload_if_changed() and p.model_info.round == 1


def test_inputs_from_npy_npz_and_csv(tmp_path, exported):
    _, files, x = exported
    flat = x[:5].reshape(5, -1)
    np.save(tmp_path / "a.npy", x[:5])
    np.savez(tmp_path / "b.npz", x_test=x[:5], y_test=np.zeros(5))
    np.savetxt(tmp_path / "c.csv", flat, delimiter=",", header=",".join(f"p{i}" for i in range(64)), comments="")
    p = Predictor(files["float32"])
    expected = p.predict(x[:5])
    for name in ("a.npy", "b.npz", "c.csv"):
        np.testing.assert_allclose(p.predict(load_inputs(tmp_path / name)), expected, atol=1e-4)
    with pytest.raises(InputError, match="choose one with --key"):
        load_inputs(tmp_path / "b.npz", key="nope")
    with pytest.raises(InputError, match="expects"):
        p.predict(np.zeros((2, 10), np.float32))
    (tmp_path / "bad.txt").write_text("1,2")
    with pytest.raises(InputError, match="unknown input format"):
        load_inputs(tmp_path / "bad.txt")


def test_predict_cli_runs_the_current_model_without_tensorflow(exported, tmp_path):
    _, files, x = exported
    store = ModelStore(tmp_path / "state" / "model", writer=True)
    copy = tmp_path / "m.tflite"
    copy.write_bytes(files["int8"].read_bytes())
    store.install(copy, ModelInfo(7, "int8", 0.8))
    np.savetxt(tmp_path / "in.csv", x[:4].reshape(4, -1), delimiter=",")
    # The CLI's whole predict path, in a fresh interpreter, with TensorFlow importable but unused.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from fedprune.edge_agent.cli import main
        rc = main(["predict", "--state-dir", {str(tmp_path / 'state')!r}, "--input", {str(tmp_path / 'in.csv')!r},
                   "--output", {str(tmp_path / 'p.npy')!r}, "--json"])
        assert "tensorflow" not in sys.modules, "the predict path imported TensorFlow"
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["round"] == 7 and out["samples"] == 4 and sum(out["class_counts"].values()) == 4
    assert out["runtime"].startswith("ai-edge-litert") and out["delegates"] == "builtin ops, no default delegates"
    probabilities = np.load(tmp_path / "p.npy")
    assert probabilities.shape == (4, 10)
    assert out["class_counts"] == {str(c): int((probabilities.argmax(-1) == c).sum())
                                   for c in sorted(set(probabilities.argmax(-1).tolist()))}

    missing = subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "predict", "--state-dir",
                              str(tmp_path / "none"), "--input", str(tmp_path / "in.csv")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert missing.returncode == 2 and "no model folder" in missing.stderr


def test_predict_refuses_an_npy_whose_header_lies_with_one_line(exported, tmp_path):
    """An .npy header declaring 40 TB used to end in a MemoryError traceback."""
    import io

    _, files, _ = exported
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)})
    (tmp_path / "huge.npy").write_bytes(header.getvalue() + bytes(256))
    proc = subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "predict", "--model", str(files["float32"]),
                           "--input", str(tmp_path / "huge.npy")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "declares (1000000000000, 64) float32" in proc.stderr


def test_predict_prints_a_summary_and_writes_each_sample_with_output(exported, tmp_path):
    """predict printed every sample's class and confidence on one JSON line."""
    _, files, x = exported
    np.save(tmp_path / "x.npy", x)
    n = len(x)
    base = [sys.executable, "-m", "fedprune.edge_agent.cli", "predict", "--model", str(files["float32"]),
            "--input", str(tmp_path / "x.npy")]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[1].startswith(f"{n} samples: class ") and lines[2].startswith("confidence: mean ")
    assert lines[3] == "add --output results.csv for each sample's class, confidence and probabilities"
    for name in ("results.csv", "results.jsonl"):
        proc = subprocess.run(base + ["--output", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].endswith(str(tmp_path / name))
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "sample,class,confidence," + ",".join(f"p{k}" for k in range(10)) and len(rows) == n + 1
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["class"] for r in records] == [int(row.split(",")[1]) for row in rows[1:]]
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-3 for r in records)
    bad = subprocess.run(base + ["--output", str(tmp_path / "out.xlsx")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "use one of .csv, .jsonl, .npy" in bad.stderr
