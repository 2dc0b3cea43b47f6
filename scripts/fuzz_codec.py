"""Benchmark-style fuzz run of every ``converters`` decoder on untrusted bytes (atheris, coverage-guided).

    .venv/bin/python scripts/fuzz_codec.py --runs 20000          # quick check (seconds)
    .venv/bin/python scripts/fuzz_codec.py                       # 1,000,000 runs (minutes)
    .venv/bin/python scripts/fuzz_codec.py --replay FILE ...     # re-run saved inputs, full tracebacks

The first input byte picks the entry point (``byte % len(ENTRY_POINTS)``); the rest is what that
decoder gets (for ``decode_mask``/``decode_values``/``decode_values_only`` a few leading bytes give
the method, count, precision ... the way a tensor table would). Every outcome is classified:
decoded OK, ``CodecError`` (expected for bad bytes), or anything else = a crash. A decoded result is
also checked against what its decoder promises (shapes, kept counts, zeros at pruned positions,
finite values); a broken promise counts as a crash too (``InvariantViolation``). Crashes do not stop
the run: the first few distinct ones are recorded with the input (hex, and a file to ``--replay``).
Inputs slower than ``--hang-ms`` and inputs that raise the peak RSS by more than ``--rss-jump-mb``
are recorded as crashes as well (``Hang``, ``HugeAllocation``); libFuzzer's own ``-timeout`` and
``-rss_limit_mb`` stop the run for a real hang or memory blow-up, which is reported as a crash.

libFuzzer ends the process with C ``exit()`` (no Python ``atexit``), so the fuzzer runs in a child
process that keeps its counters in a shared memory-mapped file; this process starts it, relays
its libFuzzer output (coverage ``cov``/``ft`` lines), and prints a short summary and, as the last
line, one JSON object.

A custom mutator runs libFuzzer's mutation and then, with probability ``--crc-fix`` (0.75), rewrites
the trailing CRC-32 of frame inputs so that mutations get past the checksum to the header, table
and length checks. The seed corpus holds valid encodings (updates of every precision, both
encodings, every compression, and with a regrowth gradient report; tasks; chunks; masks of every method; value sections,
packed and Golomb-coded both ways; JSON messages).
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Uninstrumented dependencies first: modules imported before atheris.instrument_imports() are never
# instrumented, and instrument_imports(include=["fedprune.converters"]) only touches fedprune.converters.*.
import numpy as np  # noqa: E402
import zstandard  # noqa: E402,F401
import hashlib  # noqa: E402,F401

ENTRY_POINTS = (
    "decode_update",
    "decode_task",
    "decode_self_describing",
    "decode_values_only",
    "reassembler_add",
    "decode_mask",
    "decode_values",
    "Presence.decode",
    "Architecture.decode",
    "Ack.decode",
    "RoundAnnouncement.decode",
    "open_signed",
)
EP = {name: i for i, name in enumerate(ENTRY_POINTS)}
FRAME_EPS = frozenset({EP["decode_update"], EP["decode_task"], EP["reassembler_add"], EP["open_signed"]})
SIGNED_TOPIC = "fedprune/v1/fuzz/device/dev-1/task"
SIGNING_SEED = bytes(range(32))  # the aggregator key the harness trusts

# The fixed layout a receiver holds: a small CNN (conv 3x3x1x8, dense 72x10).
NAMES = ["conv/kernel", "conv/bias", "dense/kernel", "dense/bias"]
SHAPES = [(3, 3, 1, 8), (8,), (72, 10), (10,)]
SPARSITY = 0.8
LAYOUT_SEED = 20240601
MAX_BYTES = 1 << 20  # frame limit given to decode_update / decode_task
MAX_MESSAGE_BYTES = 1 << 20  # Reassembler
MAX_N = 1 << 20  # decode_mask n / decode_values count: what DecodeLimits(max_elements=1<<20) allows
PRECISION_CHOICES = ("float32", "float16", "int8", "int8-channel", "int4", "int2", "", 3)

# shared counters (int64 slots of the stats file)
_RUNS, _DECODED, _CODEC, _CRASH, _SLOWEST_US, _DISTINCT, _PEAK_RSS_KB = range(7)
_PER_EP = 8  # then 3 slots per entry point: decoded, codec errors, crashes
N_SLOTS = _PER_EP + 3 * len(ENTRY_POINTS)
MAX_RECORDED = 10


class InvariantViolation(AssertionError):
    """A decoder returned something it promises never to return."""


def make_masks(seed: int = LAYOUT_SEED, sparsity: float = SPARSITY) -> list[np.ndarray | None]:
    """Masks of the fixed layout: kernels pruned to exactly ``sparsity``, biases dense."""
    rng = np.random.default_rng(seed)
    masks: list[np.ndarray | None] = []
    for shape in SHAPES:
        if len(shape) < 2:
            masks.append(None)
            continue
        n = int(np.prod(shape))
        flat = np.zeros(n, dtype=bool)
        flat[rng.permutation(n)[: n - round(sparsity * n)]] = True
        masks.append(flat.reshape(shape))
    return masks


# --- the test function ----------------------------------------------------------------------------


class Harness:
    """Decodes one input on the entry point its first byte names; knows nothing of the fuzzer."""

    def __init__(self) -> None:
        from fedprune.converters import chunking, codec, mask_coding, protocol, quantize, signing
        from fedprune.converters.errors import CodecError

        self.chunking, self.codec, self.mask_coding = chunking, codec, mask_coding
        self.protocol, self.quantize, self.CodecError = protocol, quantize, CodecError
        self.signing, self.verify_key = signing, signing.SigningKey.from_seed(SIGNING_SEED).public
        self.masks = make_masks()
        self.dense = [None] * len(SHAPES)
        self.limits = codec.DecodeLimits(max_elements=1 << 20)
        self.table = [
            self.update, self.task, self.self_describing, self.values_only, self.chunk, self.mask,
            self.values, self.presence, self.architecture, self.ack, self.round, self.signed,
        ]
        assert len(self.table) == len(ENTRY_POINTS)

    def run(self, data: bytes) -> tuple[int, object]:
        ep = data[0] % len(ENTRY_POINTS) if data else EP["decode_update"]
        return ep, self.table[ep](data[1:])

    # each decoder, then the promises its result must keep

    def _check_tensors(self, tensors, masks, shapes) -> None:
        if len(tensors) != len(shapes) or len(masks) != len(shapes):
            raise InvariantViolation(f"{len(tensors)} tensors / {len(masks)} masks for {len(shapes)} shapes")
        for t, m, s in zip(tensors, masks, shapes):
            s = tuple(int(d) for d in s)
            if t.shape != s or t.dtype != np.float32:
                raise InvariantViolation(f"tensor {t.shape} {t.dtype}, expected {s} float32")
            if not np.isfinite(t).all():
                raise InvariantViolation("decoded tensor holds NaN/Inf")
            if m is not None:
                if m.shape != s or m.dtype != np.bool_:
                    raise InvariantViolation(f"mask {m.shape} {m.dtype}, expected {s} bool")
                if np.any(t[~m] != 0):
                    raise InvariantViolation("nonzero value at a pruned position")

    def update(self, b: bytes):
        u = self.protocol.decode_update(b, SHAPES, self.masks, MAX_BYTES, names=NAMES)
        if u.error:
            if u.tensors is not None:
                raise InvariantViolation("an error update decoded with tensors")
        elif u.encoding == self.protocol.Encoding.VALUES_ONLY:
            self._check_tensors(u.tensors, self.masks, SHAPES)
        else:
            self._check_tensors(u.tensors, u.masks, SHAPES)
        if u.gradients is not None:  # a regrowth report: magnitudes > 0 at pruned positions only
            self._check_tensors(u.gradients, u.gradient_masks, SHAPES)
            for g, r, m in zip(u.gradients, u.gradient_masks, self.masks):
                if (g[r] <= 0).any() or (r.any() and (m is None or (r & m).any())):
                    raise InvariantViolation("gradient report: a magnitude <= 0, or a position not pruned")
        return u

    def task(self, b: bytes):
        t = self.protocol.decode_task(b, NAMES, SHAPES, MAX_BYTES)
        self._check_tensors(t.weights, t.masks, SHAPES)
        return t

    def self_describing(self, b: bytes):
        d = self.codec.decode_self_describing(b, self.limits)
        if not len(d.names) == len(d.tensors) == len(d.masks):
            raise InvariantViolation("names, tensors and masks differ in length")
        self._check_tensors(d.tensors, d.masks, [t.shape for t in d.tensors])
        if sum(t.size for t in d.tensors) > self.limits.max_elements:
            raise InvariantViolation("more elements than DecodeLimits allow")
        return d

    def values_only(self, b: bytes):
        if len(b) < 2:
            raise self.CodecError("harness: values_only input needs 2 header bytes")
        precision = PRECISION_CHOICES[b[0] % len(PRECISION_CHOICES)]
        masks = self.masks if b[1] & 1 else self.dense
        tensors = self.codec.decode_values_only(b[2:], SHAPES, masks, precision)
        self._check_tensors(tensors, masks, SHAPES)
        return tensors

    def chunk(self, b: bytes):
        r = self.chunking.Reassembler(MAX_MESSAGE_BYTES, max_pending_messages=4)
        out = r.add("src", b)
        if out is not None and len(out) > MAX_MESSAGE_BYTES:
            raise InvariantViolation("reassembled more than max_message_bytes")
        return out

    @staticmethod
    def mask_args(b: bytes) -> tuple[int, int, int, bytes]:
        """``[method u8][n u32][kept u32][data]``; n reduced to 0..MAX_N (a table's bound)."""
        if len(b) < 9:
            raise ValueError("short")
        method, n, kept = struct.unpack_from("<BII", b)
        return method, n % (MAX_N + 1), kept, b[9:]

    def mask(self, b: bytes):
        try:
            method, n, kept, data = self.mask_args(b)
        except ValueError:
            raise self.CodecError("harness: mask input needs 9 header bytes") from None
        m = self.mask_coding.decode_mask(method, data, n, kept)
        if m.shape != (n,) or m.dtype != np.bool_ or int(np.count_nonzero(m)) != kept:
            raise InvariantViolation(f"mask {m.shape} {m.dtype} with {int(np.count_nonzero(m))} kept, "
                                     f"expected ({n},) bool with {kept}")
        return m

    @staticmethod
    def values_args(b: bytes):
        """``[precision u8][count u32][n_channels u16][channels mode u8][data]``."""
        if len(b) < 8:
            raise ValueError("short")
        psel, count, n_channels, mode = struct.unpack_from("<BIHB", b)
        precision = PRECISION_CHOICES[psel % len(PRECISION_CHOICES)]
        count %= MAX_N + 1
        mode %= 6
        data = b[8:]
        if count > 8 * len(data) + 16 and mode:
            # No precision fits that many values in these bytes (a Golomb-coded one needs a bit a
            # value): decoding refuses it whatever channels is, so skip building a big array for nothing.
            return precision, count, n_channels, mode, np.zeros(0, dtype=np.int64), data
        if mode == 0:
            channels = None
        elif mode == 1:  # valid: the dense layout
            channels = np.arange(count, dtype=np.int64) % max(n_channels, 1)
        elif mode == 2:  # pattern that may leave the range
            channels = (np.arange(count, dtype=np.int64) * 7) % (n_channels + 2) - (count % 2)
        elif mode == 3:  # wrong dtype
            channels = np.zeros(count, dtype=np.float32)
        elif mode == 4:  # wrong length
            channels = np.zeros(count + 1, dtype=np.int32)
        else:  # unsigned, in range
            channels = (np.arange(count, dtype=np.uint16) % max(n_channels, 1)).astype(np.uint16)
        return precision, count, n_channels, mode, channels, data

    def values(self, b: bytes):
        try:
            precision, count, n_channels, _, channels, data = self.values_args(b)
        except ValueError:
            raise self.CodecError("harness: values input needs 8 header bytes") from None
        v = self.quantize.decode_values(data, count, precision, channels=channels, n_channels=n_channels)
        if v.shape != (count,) or v.dtype != np.float32 or not np.isfinite(v).all():
            raise InvariantViolation(f"values {v.shape} {v.dtype} (finite: {bool(np.isfinite(v).all())}), "
                                     f"expected ({count},) finite float32")
        return v

    def presence(self, b: bytes):
        return self.protocol.Presence.decode(b)

    def architecture(self, b: bytes):
        return self.protocol.Architecture.decode(b)

    def ack(self, b: bytes):
        return self.protocol.Ack.decode(b)

    def round(self, b: bytes):
        return self.protocol.RoundAnnouncement.decode(b)

    def signed(self, b: bytes):
        """A signed envelope: the payload of one the trusted key signed for the topic, else CodecError."""
        return self.signing.open_signed(SIGNED_TOPIC, b, self.verify_key, MAX_BYTES)

    def describe(self, ep: int, data: bytes) -> str:
        """The call an input makes, for a crash report."""
        b = data[1:]
        name = ENTRY_POINTS[ep]
        try:
            if name == "decode_mask":
                method, n, kept, d = self.mask_args(b)
                return f"decode_mask({method}, bytes.fromhex({d.hex()[:120]!r}...), n={n}, kept={kept})"
            if name == "decode_values":
                precision, count, nc, mode, _, d = self.values_args(b)
                return (f"decode_values(<{len(d)} bytes>, count={count}, precision={precision!r}, "
                        f"n_channels={nc}, channels=<mode {mode}>)")
            if name == "decode_values_only":
                precision = PRECISION_CHOICES[b[0] % len(PRECISION_CHOICES)]
                return (f"decode_values_only(<{len(b) - 2} bytes>, SHAPES, "
                        f"{'masks' if b[1] & 1 else 'no masks'}, {precision!r})")
        except (ValueError, IndexError):
            pass
        return f"{name}(<{len(b)} bytes>)"


# --- seeds ----------------------------------------------------------------------------------------


def build_seeds() -> list[bytes]:
    """Valid encodings for every entry point, each prefixed with its entry-point byte."""
    from fedprune.converters import chunking, codec, mask_coding, protocol, quantize, signing

    rng = np.random.default_rng(7)
    masks = make_masks()
    seeds: list[bytes] = []

    def add(ep: str, payload: bytes) -> None:
        seeds.append(bytes([EP[ep]]) + payload)

    def tensors(levels: int | None = None) -> list[np.ndarray]:
        out = []
        for shape, m in zip(SHAPES, masks):
            t = rng.normal(0, 0.1, size=shape).astype(np.float32)
            if levels:  # few distinct values: compressible, so zlib/zstd are really used
                t = (np.round(t * levels) / levels).astype(np.float32)
            out.append(t if m is None else t * m)
        return out

    precisions = list(quantize.PRECISION_NAMES)
    own = make_masks(seed=11, sparsity=0.95)
    own[1] = np.zeros(SHAPES[1], dtype=bool)
    own[1][2] = True
    payloads = []  # for chunks
    for i, precision in enumerate(precisions):
        for encoding in protocol.Encoding:
            for compression in ("none", "zlib", "zstd"):
                ts = tensors(levels=4 if compression != "none" else None)
                um = masks if encoding == protocol.Encoding.VALUES_ONLY else (own if i % 2 else make_masks(3, 0.5))
                u = protocol.Update(round=3 + i, attempt=i % 2, device_id=f"dev-{i}", num_samples=100 + i,
                                    metrics={"loss": 0.5, "accuracy": 0.75}, tensors=ts, precision=precision,
                                    encoding=encoding, compression=compression,
                                    content="weights" if i % 2 else "delta")
                frame = protocol.encode_update(u, um, names=NAMES)
                add("decode_update", frame)
                payloads.append(frame)
    add("decode_update", protocol.encode_update(
        protocol.Update(round=1, attempt=0, device_id="dev-err", num_samples=0, error="out of memory"), masks))
    # regrowth: updates with a gradient report (the pruned positions' gradient magnitudes)
    from fedprune.pruning.regrowth import report_pruned_gradients

    grads = [rng.normal(0, 1e-3, size=shape).astype(np.float32) for shape in SHAPES]
    reported, chosen = report_pruned_gradients(SHAPES, grads, masks, 0.2)
    for compression in ("none", "zlib"):
        u = protocol.Update(round=4, attempt=1, device_id="dev-g", num_samples=64, metrics={"loss": 0.5, "x": 1.0},
                            tensors=tensors(levels=4), compression=compression, gradients=reported,
                            gradient_masks=chosen)
        add("decode_update", protocol.encode_update(u, masks))
    import dataclasses

    task_extra = {}
    if any(f.name == "device_sparsity" for f in dataclasses.fields(protocol.TrainTask)):
        task_extra = {"device_sparsity": 0.5}  # device-side pruning, where this version has it
    for i, precision in enumerate(precisions):
        for compression in ("none", "zlib", "zstd"):
            ts = tensors(levels=8)
            task = protocol.TrainTask(
                **(task_extra if compression == "zlib" else {}),
                round=i, attempt=0, architecture_digest="ab" * 8, weights=ts, masks=masks,
                training={"local_epochs": 1, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.1},
                uplink_precision="int8", deadline_s=60.0, downlink_precision=precision, session="s1",
                compression=compression)
            frame = protocol.encode_task(task, NAMES, compression=compression)
            add("decode_task", frame)
            payloads.append(frame)
            add("open_signed", signing.sign_message(SIGNED_TOPIC, frame, signing.SigningKey.from_seed(SIGNING_SEED)))

    # self-describing sections: the layout, and other layouts (no expected layout is given)
    for precision in precisions:
        add("decode_self_describing", codec.encode_self_describing(tensors(), masks, NAMES, precision))
        add("decode_self_describing", codec.encode_self_describing(tensors(), own, NAMES, precision))
        # other layouts, with edge cases: empty tensors (a zero among other dimensions), rank 0
        odd = [rng.normal(size=(2, 3, 5)).astype(np.float32), rng.normal(size=(0,)).astype(np.float32),
               rng.normal(size=(40, 4)).astype(np.float32), np.zeros((3, 0, 7), np.float32),
               np.float32(rng.normal()).reshape(()), np.zeros((0, 6), np.float32)]
        odd_masks = [None, None, rng.random((40, 4)) < 0.1, None, None, np.zeros((0, 6), bool)]
        odd[2] *= odd_masks[2]
        add("decode_self_describing",
            codec.encode_self_describing(odd, odd_masks, ["a", "b\u00e9", "c" * 40, "d", "e", "f"], precision))
    add("decode_self_describing", codec.encode_self_describing([], [], [], "int8"))

    # values-only sections: [precision selector][1 = shared masks, 0 = dense][section]
    for psel, precision in enumerate(PRECISION_CHOICES[:5]):
        for use_masks in (1, 0):
            ms = masks if use_masks else [None] * len(SHAPES)
            add("decode_values_only", bytes([psel, use_masks])
                + codec.encode_values_only(tensors(), ms, precision))

    # chunks: middle and last chunks of split messages, and whole one-chunk messages
    for j, payload in enumerate(payloads[::7]):
        max_chunk = chunking.CHUNK_OVERHEAD + max(16, len(payload) // (2 + j))
        chunks = chunking.split_message(payload, max_chunk, message_id=bytes([j]) * 16)
        assert len(chunks) > 1
        for c in (chunks[0], chunks[len(chunks) // 2], chunks[-1]):
            add("reassembler_add", c)
        head = struct.pack("<16sIIQ32s", bytes([100 + j]) * 16, 0, 1, len(payload[:300]),
                           hashlib.sha256(payload[:300]).digest())
        add("reassembler_add", pack_frame_chunk(head + payload[:300]))

    # masks: [method][n u32][kept u32][bytes], every method, both minority sides
    def add_mask(method: int, data: bytes, n: int, kept: int) -> None:
        add("decode_mask", struct.pack("<BII", method, n, kept) + data)

    for n, density in ((1, 1.0), (1, 0.0), (7, 0.3), (64, 0.5), (300, 0.02), (300, 0.97), (1000, 0.2),
                       (5000, 0.05), (70000, 0.001), (2000, 0.9)):
        flat = rng.random(n) < density
        kept = int(flat.sum())
        method, data = mask_coding.encode_mask(flat)
        add_mask(int(method), data, n, kept)
        if 0 < kept < n:  # every method for this mask, through the encoder's own helper
            _, pos = mask_coding._minority(flat)
            gaps = mask_coding._gaps(pos, n)
            for size, meth, param in mask_coding._candidates(n, kept, gaps):
                if size <= min((n + 7) // 8, 3000):  # larger than the bitmap: invalid
                    add_mask(int(meth), mask_coding._encode_with(flat, meth, param, pos, gaps), n, kept)

    # value sections: [precision selector][count u32][n_channels u16][channels mode][section]
    for psel, precision in enumerate(PRECISION_CHOICES[:5]):
        for (count, nc, mode), near_max in itertools.product(
                ((0, 1, 0), (1, 1, 0), (7, 3, 1), (100, 10, 0), (100, 10, 1), (33, 4, 5)), (False, True)):
            # Gaussian codes Golomb-code zigzagged; codes near +-qmax (Adam's deltas) reflected
            v = rng.normal(0, 1, size=count).astype(np.float32)
            if near_max:
                v = (np.sign(v) * (1 - 0.05 * rng.exponential(size=count))).astype(np.float32)
            channels = None
            if quantize.precision_named(precision).per_channel and mode != 0:
                channels = np.arange(count) % nc
            section = quantize.encode_values(v, precision, channels=channels, n_channels=nc)
            add("decode_values", struct.pack("<BIHB", psel, count, nc, mode) + section)

    # JSON control messages
    add("Presence.decode", protocol.Presence("dev-1", True, 120, "0.1.0").encode())
    add("Presence.decode", protocol.Presence("dev-2", False).encode())
    add("Architecture.decode", protocol.Architecture('{"class_name": "Sequential"}', "ab" * 16,
                                                     [list(s) for s in SHAPES], NAMES).encode())
    add("Ack.decode", protocol.Ack(4, "dev-1", False, "late").encode())
    add("RoundAnnouncement.decode", protocol.RoundAnnouncement(4, 1, ["dev-1", "dev-2"], 1.7e9).encode())
    return seeds


def pack_frame_chunk(body: bytes) -> bytes:
    from fedprune.converters.frame import pack_frame

    return pack_frame(3, None, body)


# --- the fuzzing child ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import resource

    import atheris

    with atheris.instrument_imports(include=["fedprune.converters"]):
        import fedprune.converters.chunking  # noqa: F401
        import fedprune.converters.codec  # noqa: F401
        import fedprune.converters.frame  # noqa: F401
        import fedprune.converters.mask_coding  # noqa: F401
        import fedprune.converters.protocol  # noqa: F401
        import fedprune.converters.quantize  # noqa: F401
        import fedprune.converters.signing  # noqa: F401

    work = Path(args.workdir)
    harness = Harness()
    CodecError = harness.CodecError
    fd = os.open(work / "stats.bin", os.O_RDWR)
    stats = memoryview(mmap.mmap(fd, 8 * N_SLOTS)).cast("q")
    os.close(fd)
    crash_log = open(work / "crashes.jsonl", "a", encoding="utf-8")
    seen: set[tuple] = set()
    hang_us = int(args.hang_ms * 1000)
    jump_kb = args.rss_jump_mb * 1024
    peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]
    getrusage, RUSAGE_SELF, perf = resource.getrusage, resource.RUSAGE_SELF, time.perf_counter_ns

    def record(kind: str, message: str, ep: int, data: bytes, where: str, tb: str) -> None:
        stats[_CRASH] += 1
        stats[_PER_EP + 3 * ep + 2] += 1
        key = (kind, ep, where)
        if key in seen or len(seen) >= MAX_RECORDED:
            return
        seen.add(key)
        stats[_DISTINCT] = len(seen)
        repro = work / f"crash-{len(seen)}.bin"
        repro.write_bytes(data)
        crash_log.write(json.dumps({
            "type": kind, "message": message[:300], "entry_point": ENTRY_POINTS[ep], "where": where,
            "call": harness.describe(ep, data), "input_len": len(data), "input_hex": data.hex()[:200],
            "repro_file": str(repro), "traceback": tb[-3000:],
        }) + "\n")
        crash_log.flush()

    def test_one_input(data: bytes) -> None:
        stats[_RUNS] += 1
        ep = data[0] % len(ENTRY_POINTS) if data else 0
        t0 = perf()
        try:
            harness.run(data)
        except CodecError:
            stats[_CODEC] += 1
            stats[_PER_EP + 3 * ep + 1] += 1
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - every other exception is a finding
            frames = traceback.extract_tb(e.__traceback__)
            inner = next((f for f in reversed(frames) if "/converters/" in f.filename), frames[-1])
            where = f"{os.path.relpath(inner.filename, ROOT)}:{inner.lineno} in {inner.name}"
            record(type(e).__name__, str(e), ep, data, where, traceback.format_exc())
        else:
            stats[_DECODED] += 1
            stats[_PER_EP + 3 * ep] += 1
        us = (perf() - t0) // 1000
        if us > stats[_SLOWEST_US] or us > hang_us:
            # time it again: a one-off stall of a shared machine is neither the slowest input nor a hang
            t1 = perf()
            try:
                harness.run(data)
            except BaseException:  # noqa: BLE001 - already classified above
                pass
            us = min(us, (perf() - t1) // 1000)
        if us > stats[_SLOWEST_US]:
            stats[_SLOWEST_US] = us
            tmp = work / "slowest.json.tmp"
            tmp.write_text(json.dumps({"ms": us / 1000, "entry_point": ENTRY_POINTS[ep],
                                       "input_len": len(data), "input_hex": data.hex()[:200]}))
            os.replace(tmp, work / "slowest.json")
        if us > hang_us:
            record("Hang", f"input took {us / 1000:.0f} ms (> --hang-ms {args.hang_ms})", ep, data,
                   "slow input", "")
        rss = getrusage(RUSAGE_SELF).ru_maxrss
        if rss > peak[0]:
            if rss - peak[0] > jump_kb:
                record("HugeAllocation", f"peak RSS rose by {(rss - peak[0]) // 1024} MiB to {rss // 1024} MiB",
                       ep, data, "memory", "")
            peak[0] = rss
            stats[_PEAK_RSS_KB] = rss

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        out = atheris.Mutate(data, max_size)
        if (len(out) >= 1 + 14 and out[0] % len(ENTRY_POINTS) in FRAME_EPS
                and (seed % 1000) < args.crc_fix * 1000):
            body = out[1:-4]
            out = out[:1] + body + struct.pack("<I", zlib.crc32(body))
        return out

    libfuzzer_args = [
        sys.argv[0], f"-runs={args.runs}", f"-seed={args.seed}", f"-max_len={args.max_len}",
        f"-rss_limit_mb={args.rss_limit_mb}", f"-timeout={args.timeout_s}",
        f"-artifact_prefix={work}/", "-print_final_stats=1", str(work / "corpus"),
    ]
    atheris.Setup(libfuzzer_args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()  # ends the process (C exit) when the runs are done


# --- the parent: seeds, child, summary ------------------------------------------------------------


_STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+(?:cov: (\d+) )?(?:ft: (\d+) )?(?:corp: (\d+)/(\S+) )?")
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")


def relay(stream, state: dict, verbose: bool) -> None:
    """Copy the child's libFuzzer output to stderr (NEW/REDUCE lines only with -v); keep the
    latest coverage figures and the final stats."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        state["tail"].append(line)
        del state["tail"][:-60]
        m = _STATUS.match(line)
        if m:
            if m.group(3):
                state["cov"] = int(m.group(3))
            if m.group(4):
                state["ft"] = int(m.group(4))
            if m.group(5):
                state["corpus_units"], state["corpus_size"] = int(m.group(5)), m.group(6)
            if not verbose and m.group(2) in ("NEW", "REDUCE"):
                continue
        s = _STAT.match(line)
        if s:
            state["stat"][s.group(1)] = int(s.group(2))
        if line.startswith("###### Recommended dictionary"):
            state["dictionary"] = True
        quiet = state.get("dictionary") or line.startswith(("INFO: Instrumenting", "WARNING: Failed to find"))
        if line.startswith("###### End of recommended dictionary"):
            state["dictionary"] = False
        if verbose or not quiet:
            print(line, file=sys.stderr, flush=True)


def artifacts(work: Path, tail: list[str]) -> list[dict]:
    """Inputs libFuzzer saved when it stopped the child (crash-, timeout-, oom-, leak-...)."""
    out = []
    for p in sorted(work.iterdir()):
        if p.is_file() and re.match(r"^(crash|timeout|oom|leak|slow-unit)-[0-9a-f]{40}$", p.name):
            data = p.read_bytes()
            ep = data[0] % len(ENTRY_POINTS) if data else 0
            out.append({"type": "libFuzzer-" + p.name.split("-")[0], "message": "the fuzzer process was stopped",
                        "entry_point": ENTRY_POINTS[ep], "input_len": len(data), "input_hex": data.hex()[:200],
                        "repro_file": str(p), "tail": tail[-20:]})
    return out


def summarize(args, work: Path, state: dict, wall: float, rc: int | None, n_seeds: int) -> int:
    fd = os.open(work / "stats.bin", os.O_RDONLY)
    with mmap.mmap(fd, 8 * N_SLOTS, access=mmap.ACCESS_READ) as mm:
        s = list(struct.unpack(f"<{N_SLOTS}q", mm[:]))
    os.close(fd)
    first = []
    log_path = work / "crashes.jsonl"
    if log_path.exists():
        first = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    stopped = artifacts(work, state["tail"])
    crashes = s[_CRASH] + len(stopped)
    abnormal = rc not in (0, None) and not stopped
    if abnormal:  # the child died without an artifact (killed, or an error outside the fuzz loop)
        crashes += 1
        first.append({"type": "FuzzerExit", "message": f"fuzzer process exited with status {rc}",
                      "entry_point": None, "tail": state["tail"][-15:]})
    first.extend(stopped)
    slowest = {}
    if (work / "slowest.json").exists():
        slowest = json.loads((work / "slowest.json").read_text())
    per_ep = {
        name: {"runs": sum(s[_PER_EP + 3 * i : _PER_EP + 3 * i + 3]), "decoded": s[_PER_EP + 3 * i],
               "codec_errors": s[_PER_EP + 3 * i + 1], "crashes": s[_PER_EP + 3 * i + 2]}
        for i, name in enumerate(ENTRY_POINTS)
    }
    stat = state["stat"]
    result = {
        "benchmark": "fuzz_codec",
        "runs": s[_RUNS],
        "decoded": s[_DECODED],
        "codec_errors": s[_CODEC],
        "crashes": crashes,
        "slowest_ms": round(s[_SLOWEST_US] / 1000, 2),
        "slowest": slowest,
        "wall_s": round(wall, 1),
        "exec_per_s": round(s[_RUNS] / wall) if wall else None,
        "seed": args.seed,
        "max_len": args.max_len,
        "seed_inputs": n_seeds,
        "coverage": {"cov": state.get("cov"), "ft": state.get("ft"), "corpus_units": state.get("corpus_units"),
                     "corpus_size": state.get("corpus_size")},
        "libfuzzer": {"exit_status": rc, **stat},
        "peak_rss_mb": round(s[_PEAK_RSS_KB] / 1024),
        "per_entry_point": per_ep,
        "first_crashes": first,
    }
    print()
    print(f"fuzz_codec: {s[_RUNS]:,} inputs in {wall:.1f} s ({result['exec_per_s']} /s), seed {args.seed}, "
          f"max_len {args.max_len}, {n_seeds} seed inputs")
    print(f"  decoded {s[_DECODED]:,}   CodecError {s[_CODEC]:,}   crashes {crashes:,}   "
          f"slowest {result['slowest_ms']} ms ({slowest.get('entry_point', '-')})   "
          f"coverage cov={state.get('cov')} ft={state.get('ft')} corpus={state.get('corpus_units')}")
    for name, c in per_ep.items():
        print(f"  {name:26s} runs {c['runs']:>9,}  decoded {c['decoded']:>9,}  "
              f"CodecError {c['codec_errors']:>9,}  crashes {c['crashes']:>6,}")
    for c in first:
        print(f"  CRASH {c['type']} in {c.get('entry_point')} at {c.get('where', '-')}: {c.get('message', '')[:160]}")
        if c.get("call"):
            print(f"        call: {c['call']}")
        if c.get("repro_file"):
            print(f"        replay: {sys.executable} {sys.argv[0]} --replay {c['repro_file']}")
    if crashes:
        print(f"  inputs and logs kept in {work}")
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 1 if crashes else 0


def replay(files: list[str]) -> int:
    """Run saved inputs through the harness (uninstrumented) and print each outcome in full."""
    harness = Harness()
    bad = 0
    for f in files:
        data = Path(f).read_bytes()
        ep = data[0] % len(ENTRY_POINTS) if data else 0
        t0 = time.perf_counter()
        try:
            harness.run(data)
            outcome = "decoded OK"
        except harness.CodecError as e:
            outcome = f"CodecError: {e}"
        except Exception:  # noqa: BLE001
            bad += 1
            outcome = "CRASH\n" + traceback.format_exc()
        print(f"{f}: {ENTRY_POINTS[ep]} [{harness.describe(ep, data)}] "
              f"{(time.perf_counter() - t0) * 1000:.1f} ms: {outcome}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer -seed (0: random)")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--timeout-s", type=int, default=60, help="libFuzzer -timeout per input (stops the run)")
    parser.add_argument("--hang-ms", type=float, default=2000.0, help="record slower inputs as crashes")
    parser.add_argument("--rss-jump-mb", type=int, default=256,
                        help="record an input that raises the peak RSS by more than this as a crash")
    parser.add_argument("--crc-fix", type=float, default=0.75,
                        help="probability that the mutator rewrites a frame's trailing CRC-32")
    parser.add_argument("--workdir", help="keep corpus, crash inputs and logs here (default: a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="relay every libFuzzer line")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="re-run saved inputs and exit")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.replay:
        return replay(args.replay)
    if args._worker:
        worker(args)
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fuzz_codec-"))
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    seeds = build_seeds()
    for i, s in enumerate(seeds):
        if len(s) > args.max_len:
            print(f"warning: seed {i} ({ENTRY_POINTS[s[0]]}) of {len(s)} bytes exceeds --max-len", file=sys.stderr)
        (work / "corpus" / f"seed-{i:04d}").write_bytes(s)
    (work / "stats.bin").write_bytes(bytes(8 * N_SLOTS))
    for stale in ("crashes.jsonl", "slowest.json"):
        (work / stale).unlink(missing_ok=True)

    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", "--workdir", str(work),
           "--runs", str(args.runs), "--seed", str(args.seed), "--max-len", str(args.max_len),
           "--rss-limit-mb", str(args.rss_limit_mb), "--timeout-s", str(args.timeout_s),
           "--hang-ms", str(args.hang_ms), "--rss-jump-mb", str(args.rss_jump_mb), "--crc-fix", str(args.crc_fix)]
    state: dict = {"tail": [], "stat": {}}
    start = time.monotonic()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    reader = threading.Thread(target=relay, args=(child.stdout, state, args.verbose), daemon=True)
    reader.start()
    try:
        rc = child.wait()
    except KeyboardInterrupt:
        child.terminate()
        rc = child.wait()
    reader.join(timeout=5)
    wall = time.monotonic() - start
    status = summarize(args, work, state, wall, rc, len(seeds))
    if not status and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
