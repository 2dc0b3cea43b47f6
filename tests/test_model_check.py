"""Mutated .tflite files crash LiteRT 2.3.0 (SIGSEGV): ``Predictor`` runs each file once in a child
first (fedprune.edge_agent.model_check), so the crash is an error and this process goes on.

``tests/data/tiny-int8.tflite`` is a sparse int8 MLP (8 -> 8 -> 3) exported by fedprune; the
mutations below are ones ``scripts/fuzz_tflite.py --model tests/data/tiny-int8.tflite --seed 2``
found to crash the runtime.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_agent.inference import Predictor
from fedprune.edge_agent.model_check import ModelCheckError, check_tflite, forget_checks

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "tiny-int8.tflite"
CRASHERS = [(1573, 0xFF), (1899, 0xAD)]  # (offset, byte): SIGSEGV in LiteRT 2.3.0


def mutated(offset: int, value: int) -> bytes:
    data = bytearray(MODEL.read_bytes())
    data[offset] = value
    return bytes(data)


@pytest.fixture(autouse=True)
def fresh_checks():
    forget_checks()  # each test checks its files again


def test_the_model_predicts_and_is_checked_once_per_process(tmp_path):
    p = Predictor(MODEL, runtimes=("litert",))
    assert p.predict(np.zeros((2, 8), np.float32)).shape == (2, 3)
    check_tflite(MODEL.read_bytes(), ("litert",), timeout_s=0.001)  # cached: no child, so no timeout


@pytest.mark.parametrize("offset,value", CRASHERS)
def test_a_file_that_crashes_the_runtime_is_an_error_not_the_end_of_the_process(tmp_path, offset, value):
    path = tmp_path / "mutated.tflite"
    path.write_bytes(mutated(offset, value))
    # The reason for the child: loaded as it is, the file kills the process that loads it.
    code = ("import sys, numpy as np\nfrom fedprune.converters.tflite_export import load_interpreter, predict_tflite\n"
            "i = load_interpreter(sys.stdin.buffer.read(), None, ('litert',)).interpreter\n"
            "predict_tflite(i, np.zeros((1, 8), np.float32))\n")
    raw = subprocess.run([sys.executable, "-c", code], input=path.read_bytes(), capture_output=True, timeout=60)
    assert raw.returncode < 0, raw.stderr[-300:]
    with pytest.raises(ModelCheckError, match=r"crashed the TFLite runtime \(SIG\w+\) when loaded and run once"):
        Predictor(path, runtimes=("litert",))


def test_a_hang_is_stopped_at_the_timeout_and_refused_files_say_why(tmp_path, monkeypatch):
    with pytest.raises(ModelCheckError, match="did not load and run within 0.01 s"):
        check_tflite(MODEL.read_bytes(), ("litert",), timeout_s=0.01)
    with pytest.raises(ModelCheckError, match="refused by the TFLite runtime: ValueError"):
        check_tflite(b"not a flatbuffer", ("litert",))


def test_predict_reports_a_crashing_file_in_one_line(tmp_path):
    path = tmp_path / "mutated.tflite"
    path.write_bytes(mutated(*CRASHERS[0]))
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    proc = subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "predict", "--model", str(path),
                           "--input", str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and "crashed the TFLite runtime (SIGSEGV)" in proc.stderr
