"""The aggregator's checks on an update, before and after decoding (``intake.check_update``), and
the collection of one attempt's updates: no TensorFlow, no broker."""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import numpy as np
import pytest

from codec_helpers import recrc
from fedprune.aggregator.collect import AttemptCollector, DeviceLink, RoundProgress
from fedprune.aggregator.inbox import BoundedInbox
from fedprune.aggregator.intake import Rejection, RoundContext, check_update
from fedprune.aggregator.registry import DeviceRegistry
from fedprune.aggregator.strategies import ClientResult
from fedprune.aggregator.update_buffers import UpdateBuffers
from fedprune.converters.codec import MaskLayout
from fedprune.converters.protocol import Ack, Encoding, Topics, Update, encode_update

# The digits CNN of federation_helpers.small_task, written out: its kernels but the logits' masked
SHAPES = [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (1024, 128), (128,), (128, 10), (10,)]
NAMES = ["conv1/kernel", "conv1/bias", "conv2/kernel", "conv2/bias", "dense1/kernel", "dense1/bias",
         "logits/kernel", "logits/bias"]
MASKS = [np.ones(s, bool) if i in (0, 2, 4) else None for i, s in enumerate(SHAPES)]
TOPICS = Topics("fed")


def _context(selected=("dev-1",), known=("dev-1",), precision="int8", max_message_bytes=64_000_000,
             **kw) -> RoundContext:
    fields = dict(round=2, attempt=1, selected=tuple(selected), known=set(known).__contains__, topics=TOPICS,
                  shapes=SHAPES, masks=MASKS, names=NAMES, max_message_bytes=max_message_bytes,
                  uplink_precision=precision, device_masks=False,
                  global_weights=[np.zeros(s, np.float32) for s in SHAPES], layout=MaskLayout.of(SHAPES, MASKS))
    fields.update(kw)
    return RoundContext(**fields)


def _update(**kw) -> bytes:
    fields = dict(round=2, attempt=1, device_id="dev-1", num_samples=50, metrics={"loss": 0.1},
                  tensors=[np.zeros(s, np.float32) for s in SHAPES], precision="int8")
    fields.update(kw)
    return encode_update(Update(**fields), MASKS)


def test_intake_collection_strategies_and_the_pruning_controller_load_no_tensorflow():
    code = ("import sys, fedprune.aggregator.intake, fedprune.aggregator.collect, fedprune.aggregator.strategies, "
            "fedprune.pruning.controller; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tf_keras', 'keras')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_a_valid_update_is_accepted():
    result = check_update(_context(), TOPICS.update("dev-1"), _update())
    assert isinstance(result, ClientResult) and result.device_id == "dev-1" and result.num_samples == 50


@pytest.mark.parametrize("kw,topic_device,selected,reason", [
    ({"precision": "float32"}, "dev-1", ["dev-1"], "wrong encoding"),
    ({"round": 1}, "dev-1", ["dev-1"], "wrong round"),  # a closed round
    ({"round": 3}, "dev-1", ["dev-1"], "wrong round"),  # a future one
    ({"attempt": 2}, "dev-1", ["dev-1"], "wrong round"),
    ({"device_id": "ghost"}, "ghost", ["ghost"], "unknown device"),
    ({}, "dev-1", ["other"], "not selected"),
    ({"tensors": None, "error": "out of memory"}, "dev-1", ["dev-1"], "device error"),
])
def test_bad_updates_are_rejected_with_the_reason(kw, topic_device, selected, reason):
    result = check_update(_context(selected=selected), TOPICS.update(topic_device), _update(**kw))
    assert isinstance(result, Rejection) and result.reason.startswith(reason), result
    assert result.kind == reason and result.device_id == topic_device


def test_a_duplicate_garbage_and_a_bad_topic_are_rejected():
    topic = TOPICS.update("dev-1")
    first = check_update(_context(), topic, _update())
    assert isinstance(first, ClientResult)
    assert check_update(_context(), topic, _update(), reported={"dev-1": first}).reason.startswith("duplicate")
    assert check_update(_context(), topic, b"\x00" * 40).reason.startswith("undecodable")
    no_device = check_update(_context(), "fedprune/elsewhere", _update())
    assert no_device.reason.startswith("bad topic") and no_device.device_id == ""


def _check(ctx: RoundContext, data: bytes) -> str:
    result = check_update(ctx, TOPICS.update("dev-1"), data)
    assert isinstance(result, (ClientResult, Rejection))
    return result.reason if isinstance(result, Rejection) else ""


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_values_are_rejected(bad):
    ctx = _context(precision="float32", max_message_bytes=1_000_000)
    tensors = [np.zeros(s, np.float32) for s in SHAPES]
    tensors[0].flat[7] = 1.25
    good = _update(precision="float32", tensors=tensors)
    assert _check(ctx, good) == ""
    at = good.index(np.float32(1.25).tobytes())
    poisoned = recrc(good[:at] + np.float32(bad).tobytes() + good[at + 4:])
    assert _check(ctx, poisoned).startswith("undecodable: values contain NaN or Inf")


def test_wrong_layouts_and_oversize_updates_are_rejected():
    ctx = _context(precision="float32", max_message_bytes=1_000_000)
    tensors = [np.zeros(s, np.float32) for s in SHAPES]
    # Values for a model with one tensor less, against the masks it would have.
    short = encode_update(Update(2, 1, "dev-1", 50, tensors=tensors[:-1], precision="float32"), MASKS[:-1])
    assert _check(ctx, short).startswith("undecodable: values section is 605184 bytes, expected 605224")
    # Self-describing, with the right shapes under other tensor names.
    renamed = encode_update(Update(2, 1, "dev-1", 50, tensors=tensors, precision="float32",
                                   encoding=Encoding.SELF_DESCRIBING),
                            MASKS, names=[f"other/{n}" for n in NAMES])
    assert "expected" in _check(ctx, renamed)
    # Over the task's transport.max_message_bytes (1,000,000 here).
    assert "exceeds" in _check(ctx, _update(precision="float32") + b"\0" * 500_000)


def test_weights_become_deltas_and_device_masks_need_weights_with_masks():
    rng = np.random.default_rng(0)
    base = [rng.normal(size=s).astype(np.float32) * m if m is not None else rng.normal(size=s).astype(np.float32)
            for s, m in zip(SHAPES, MASKS)]
    sent = [w + 0.5 for w in base]
    data = encode_update(Update(2, 1, "dev-1", 50, tensors=sent, precision="float32", content="weights"), MASKS)
    result = check_update(_context(precision="float32", global_weights=base), TOPICS.update("dev-1"), data)
    assert all(np.allclose(d, 0.5, atol=1e-5) for d in result.delta)
    refused = check_update(_context(device_masks=True), TOPICS.update("dev-1"), _update())
    assert refused.reason.startswith("wrong encoding: device-side pruning needs weights")


class _Publisher:
    """Records what would be signed and published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, best_effort: bool = False) -> None:
        self.published.append((topic, payload, retain))

    def clear(self, topic: str) -> None:
        self.published.append((topic, b"", True))


def _collector(devices, ctx, buffers=None, progress=None):
    registry = DeviceRegistry()
    for d in devices:
        registry.update(d, True, 50)
    inbox = BoundedInbox(1 << 30)
    link = DeviceLink(_Publisher(), TOPICS, registry, inbox)
    return AttemptCollector(link, ctx, {}, buffers, progress), inbox


def test_each_accepted_update_of_a_round_decodes_into_its_own_reserved_row():
    devices = ["dev-1", "dev-2", "dev-3"]
    ctx = _context(selected=devices, known=devices)
    buffers = UpdateBuffers(SHAPES, 2)  # as run() reserves them: one row fewer than the updates here
    collector, inbox = _collector(devices, ctx, buffers)
    rng = np.random.default_rng(0)
    sent = {d: [rng.normal(size=s).astype(np.float32) * 0.1 for s in SHAPES] for d in devices}
    now = time.monotonic()
    for d in devices:
        inbox.put((TOPICS.update(d), _update(device_id=d, tensors=sent[d]), now))
    results = {r.device_id: r for r in collector.collect(now, now + 30).results}
    for i, d in enumerate(devices[:2]):  # row i holds the i-th accepted update, and nothing else does
        row = buffers.row(i)
        assert all(np.shares_memory(t, r) for t, r in zip(results[d].delta, row))
        assert all(np.allclose(t, s, atol=0.1 * 4 / 127) for t, s in zip(results[d].delta, sent[d]))
    assert not any(np.shares_memory(a, b) for a in results["dev-1"].delta for b in results["dev-2"].delta)
    # a third accepted update has no row left: it decodes into arrays of its own
    assert not any(np.shares_memory(t, buffers._block) for t in results["dev-3"].delta)


def test_an_attempt_acks_rejects_counts_and_clears_its_tasks():
    devices = ["dev-1", "dev-2"]
    progress: list[RoundProgress] = []
    collector, inbox = _collector(devices, _context(selected=devices, known=devices), progress=progress.append)
    now = time.monotonic()
    inbox.put((TOPICS.update("dev-2"), _update(device_id="dev-2", round=1), now))  # stale: rejected
    inbox.put((TOPICS.update("dev-1"), _update(), now))
    collector.link.registry.update("dev-2", False, 50)  # then dev-2 goes offline: nobody left is due
    out = collector.collect(now, now + 30)
    assert [r.device_id for r in out.results] == ["dev-1"] and out.received == 2
    assert collector.rejections == {"wrong round": 1} and (out.offline, out.lost) == (1, 0)
    published = collector.link.publisher.published
    acks = [Ack.decode(p) for t, p, _ in published if t.endswith("/ack")]
    assert [(a.device_id, a.accepted) for a in acks] == [("dev-2", False), ("dev-1", True)]
    assert [(t, p) for t, p, _ in published if t.endswith("/task")] == [(TOPICS.task(d), b"") for d in devices]
    assert progress[0] == RoundProgress(2, 1, 2, 0, 0)
    assert progress[-1] == RoundProgress(2, 1, 2, 1, 1, "dev-1", len(_update()), "")
    assert progress[1].device_id == "dev-2" and progress[1].refused.startswith("wrong round: update is for round 1")


def test_a_device_that_reports_a_failure_closes_its_slot_at_once_and_says_why():
    """A device whose data does not fit the model reported its failure, and the round still waited
    out round_timeout_s (120 s) for it."""
    devices = ["dev-1", "dev-2"]
    collector, inbox = _collector(devices, _context(selected=devices, known=devices))
    now = time.monotonic()
    error = "TrainingError: local data has sample shape (30,), the model expects (8, 8, 1)"
    inbox.put((TOPICS.update("dev-2"), _update(device_id="dev-2", tensors=None, error=error), now))
    inbox.put((TOPICS.update("dev-1"), _update(), now))
    started = time.monotonic()
    out = collector.collect(now, now + 30)  # both slots closed: the attempt ends long before its deadline
    assert time.monotonic() - started < 5
    assert [r.device_id for r in out.results] == ["dev-1"] and (out.offline, out.lost) == (0, 0)
    assert out.failures == {"dev-2": error} and collector.rejections == {"device error": 1}


def test_a_byte_identical_copy_of_an_accepted_update_is_a_redelivery_not_a_rejection():
    """QoS 1 delivers at least once, and a device answers a resumed aggregator's repeated task with
    the update it sent before: such copies were counted as rejected ("rejected 3" after a resume)."""
    devices = ["dev-1", "dev-2"]
    collector, inbox = _collector(devices, _context(selected=devices, known=devices))
    now = time.monotonic()
    first = _update()
    inbox.put((TOPICS.update("dev-1"), first, now))
    inbox.put((TOPICS.update("dev-1"), first, now))  # the same bytes again
    inbox.put((TOPICS.update("dev-1"), _update(num_samples=51), now))  # another update: a duplicate
    inbox.put((TOPICS.update("dev-2"), _update(device_id="dev-2"), now))
    out = collector.collect(now, now + 30)
    assert sorted(r.device_id for r in out.results) == devices and out.received == 4
    assert out.redelivered == 1 and collector.rejections == {"duplicate": 1}


def test_a_device_gets_one_rejection_ack_per_round_however_many_it_sends():
    devices = ["dev-1", "dev-2"]
    collector, inbox = _collector(devices, _context(selected=devices, known=devices))
    now = time.monotonic()
    error = "Traceback (most recent call last):\n  forged log line\n" + "x" * 70_000
    for _ in range(50):  # stale updates, then failure reports with a long multi-line text
        inbox.put((TOPICS.update("dev-2"), _update(device_id="dev-2", round=1), now))
    inbox.put((TOPICS.update("dev-2"), encode_update(Update(2, 1, "dev-2", 50, error=error), MASKS), now))
    inbox.put((TOPICS.update("dev-1"), _update(), now))
    collector.link.registry.update("dev-2", False, 50)
    collector.collect(now, now + 30)
    acks = [Ack.decode(p) for t, p, _ in collector.link.publisher.published if t.endswith("/ack")]
    assert [(a.device_id, a.accepted) for a in acks] == [("dev-2", False), ("dev-1", True)]
    assert collector.rejections == {"wrong round": 50, "device error": 1}
    # the next attempt of the same round shares the record: still no second ack for dev-2
    again, inbox2 = _collector(devices, _context(selected=devices, known=devices))
    again.rejection_acked, again.rejections = collector.rejection_acked, collector.rejections
    inbox2.put((TOPICS.update("dev-2"), encode_update(Update(2, 1, "dev-2", 50, error=error), MASKS), now))
    again.link.registry.update("dev-2", False, 50)
    again.collect(now, now + 1)
    assert not [t for t, _, _ in again.link.publisher.published if t.endswith("/ack")]


def test_a_failure_text_is_logged_and_echoed_as_one_short_line():
    error = "Traceback\n2026-01-01 INFO forged: everything is fine\r\n\x1b[2J" + "y" * 70_000
    data = encode_update(Update(2, 1, "dev-1", 50, error=error), MASKS)
    rejection = check_update(_context(), TOPICS.update("dev-1"), data)
    assert rejection.reason.startswith("device error: Traceback 2026-01-01 INFO forged: everything is fine")
    assert "\n" not in rejection.reason and "\r" not in rejection.reason and "\x1b" not in rejection.reason
    assert len(rejection.reason) <= len("device error: ") + 200
