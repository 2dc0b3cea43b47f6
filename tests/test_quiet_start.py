"""Quiet starts: the command-line tools load TensorFlow without its start-up noise (absl's
pre-init warning, oneDNN and CUDA notes, the cuInit error on machines without a GPU driver),
losing nothing else written to stderr meanwhile."""

from __future__ import annotations

import os
import subprocess
import sys

from fedprune.quiet_start import QUIET_START_ENV, is_noise


def test_loading_tensorflow_quietly_keeps_every_other_line():
    code = ("import os, sys, threading\n"
            "from fedprune.quiet_start import stderr_filtered\n"
            "with stderr_filtered():\n"
            "    os.write(2, b'I0000 00:00:1796589650.961274    6614 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
            "    os.write(2, b'a line of our own\\n')\n"
            "    import fedprune.keras_setup\n"
            "    sys.stderr.write('a log line meanwhile\\n')\n"
            "print('after', file=sys.stderr)\n")
    env = {**os.environ, QUIET_START_ENV: "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "a line of our own\na log line meanwhile\nafter\n"
    # Without the request (a library user), TensorFlow is left as it is.
    plain = subprocess.run([sys.executable, "-c", "import fedprune.keras_setup"], capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != QUIET_START_ENV})
    assert plain.returncode == 0 and any(is_noise(line.encode()) for line in plain.stderr.splitlines()), plain.stderr


def test_when_the_block_fails_the_noise_follows_it_may_say_why():
    code = ("import os\nfrom fedprune.quiet_start import stderr_filtered\n"
            "with stderr_filtered():\n"
            "    os.write(2, b'E0000 00:00:1.0  1 cuda_platform.cc:52] failed call to cuInit\\n')\n"
            "    raise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "failed call to cuInit" in proc.stderr
