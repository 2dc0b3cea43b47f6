"""Tests for fedprune.converters.protocol: topics, JSON control messages, tasks and updates.

Tasks and updates arrive from the network: any byte string either decodes or raises
``CodecError``, whatever was flipped, cut, added or spliced, with the frame checksum left stale
(so the frame check catches it) or recomputed (so the header, table and length checks must).
"""

from __future__ import annotations

import dataclasses

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from codec_helpers import decode_or_codec_error, expect_codec_error, mutate, recrc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprune.converters.codec import Compression, compress, encode_self_describing, encode_values_only, n_channels
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import CRC, FRAME_OVERHEAD, FRAME_VERSION, PREFIX, pack_frame, pack_varint, unpack_frame
from fedprune.converters.protocol import (
    PROTOCOL_VERSION,
    TOPIC_ROOT,
    UPDATE_OVERHEAD_BYTES,
    Ack,
    Architecture,
    Encoding,
    Kind,
    Presence,
    RoundAnnouncement,
    Topics,
    TrainingSettings,
    TrainTask,
    Update,
    decode_task,
    decode_update,
    encode_task,
    encode_update,
    peek_update,
    update_size_bound,
    valid_device_id,
)
from fedprune.converters.quantize import PRECISIONS, precision_named, quantization_error_bound
from fedprune.converters.mask_coding import mask_digest

PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALL = list(PRECISIONS)
MAX = 1 << 22

SHAPES = [(16, 12), (12,), (3, 3, 4, 8), (8,)]
NAMES = ["dense/kernel", "dense/bias", "conv/kernel", "conv/bias"]
# offsets in an update frame (no JSON header) of make_update's: the prefix, then round, attempt and
# samples (a varint byte each), the flags and precision bytes, the mask digest, the metrics
BODY = PREFIX.size
FLAGS_AT = BODY + 3
PRECISION_AT = BODY + 4
DIGEST_AT = BODY + 5
METRICS_AT = DIGEST_AT + 16


def example_masks(seed: int = 0) -> list[np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return [rng.random(SHAPES[0]) > 0.4, None, rng.random(SHAPES[2]) > 0.7, None]


def example_tensors(masks, seed: int = 1, scale: float = 1.0, compressible: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = []
    for s, m in zip(SHAPES, masks):
        t = rng.standard_normal(s) * scale
        if compressible:  # mostly zeros, long runs of one code: compresses at every precision, entropy-coded too
            t = np.round(t / scale * 2) * (scale / 2)
            t.ravel()[np.arange(t.size) % 16 != 0] = 0.0
        t = t.astype(np.float32)
        ts.append(t if m is None else np.where(m, t, 0.0).astype(np.float32))
    return ts


def make_update(precision="int8", *, encoding=Encoding.VALUES_ONLY, content="delta", compression="none",
                error="", seed=0, compressible=False):
    masks = example_masks(seed)
    tensors = None if error else example_tensors(masks, seed + 1, scale=0.05, compressible=compressible)
    u = Update(round=3, attempt=1, device_id="dev-7", num_samples=42,
               metrics={"loss": 0.25, "accuracy": 0.875, "train_s": 12.5}, tensors=tensors, content=content,
               precision=precision, encoding=encoding, compression=compression, error=error)
    return u, masks


TRAINING = {"local_epochs": 2, "batch_size": 16, "optimizer": "adam", "learning_rate": 0.002}


def make_task(downlink="float32", compressible=False, **kw) -> TrainTask:
    masks = example_masks(3)
    fields = dict(
        round=5, attempt=2, architecture_digest="abc123", weights=example_tensors(masks, 4, compressible=compressible),
        masks=masks, training=TRAINING,
        uplink_precision="int4", deadline_s=120.5, downlink_precision=downlink, session="s-1f2e",
        update_content="weights", error_feedback=False, stochastic_rounding=True, compression="zstd",
        device_sparsity=0.75,
    )
    fields.update(kw)
    return TrainTask(**fields)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    """Overwrite bytes of a frame and fix its checksum, so that the check behind it is reached."""
    return recrc(data[:offset] + new + data[offset + len(new):])


def reframe(data: bytes, header_changes: dict | None = None, drop: tuple = (), body: bytes | None = None,
            kind: int | None = None) -> bytes:
    """A task frame with its JSON header edited (a valid frame again)."""
    k, h, b = unpack_frame(data, MAX)
    h = {key: v for key, v in h.items() if key not in drop}
    h.update(header_changes or {})
    return pack_frame(k if kind is None else kind, h, bytes(b) if body is None else body)


def assert_close(orig, out, mask, precision) -> None:
    p = precision_named(precision)
    assert out.shape == orig.shape and out.dtype == np.float32
    sel = np.ones(orig.shape, bool) if mask is None else mask
    assert np.all(out[~sel] == 0.0) and not np.signbit(out[~sel]).any()
    ch, c = None, 1
    if p.per_channel:
        c = n_channels(orig.shape)
        ch = np.flatnonzero(sel.ravel()) % c
    bound = quantization_error_bound(orig[sel], p, ch, c)
    assert float(np.abs(out[sel].astype(np.float64) - orig[sel]).max(initial=0.0)) <= bound


def same_masks(a, b) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None
                                                                     and np.array_equal(x, y)) for x, y in zip(a, b))


# --------------------------------------------------------------------------- topics


def test_topics():
    t = Topics("fed-1")
    assert TOPIC_ROOT == "fedprune/v1" and t.root == "fedprune/v1/fed-1"
    assert t.presence("d1") == "fedprune/v1/fed-1/presence/d1"
    assert t.architecture == "fedprune/v1/fed-1/model/architecture"
    assert t.round == "fedprune/v1/fed-1/round"
    assert t.task("d1") == "fedprune/v1/fed-1/device/d1/task"
    assert t.update("d1") == "fedprune/v1/fed-1/device/d1/update"
    assert t.ack("d1") == "fedprune/v1/fed-1/device/d1/ack"
    assert t.all_presence == "fedprune/v1/fed-1/presence/+"
    assert t.all_updates == "fedprune/v1/fed-1/device/+/update"


@pytest.mark.parametrize("federation", ["", "a/b", "a+", "#", "/"])
def test_topics_refuse_bad_federation_ids(federation):
    with pytest.raises(ValueError):
        Topics(federation)


@pytest.mark.parametrize("device", ["d1", "dev-7", "ünï", "a.b_c", "x" * 128])
def test_device_from_topic(device):
    t = Topics("fed")
    for topic in (t.presence(device), t.task(device), t.update(device), t.ack(device)):
        assert t.device_from_topic(topic) == device


@pytest.mark.parametrize("topic", [
    "fedprune/v1/fed/round",
    "fedprune/v1/fed",
    "fedprune/v1/fed/",
    "fedprune/v1/other/device/d1/update",
    "fedprune/v1/fed2/device/d1/update",  # a federation whose id starts with this one's
    "fedprune/v2/fed/device/d1/update",
    "fedprune/v1/fed/presence",
    "other/fedprune/v1/fed/presence/d1",
    "",
])
def test_device_from_topic_refuses_other_topics(topic):
    with pytest.raises(ValueError):
        Topics("fed").device_from_topic(topic)


def test_device_from_topic_refuses_the_architecture_topic():
    t = Topics("fed")
    with pytest.raises(ValueError):
        t.device_from_topic(t.architecture)


@pytest.mark.parametrize("device,ok", [
    ("d1", True), ("dev-7", True), ("x" * 128, True), ("é" * 64, True), ("with space", True),
    ("", False), ("x" * 129, False), ("é" * 65, False), ("a/b", False), ("a+", False), ("#", False),
    ("a\x00b", False), ("a\nb", False), ("tab\t", False), ("\u200b", False),
])
def test_valid_device_id(device, ok):
    assert valid_device_id(device) is ok


# --------------------------------------------------------------------------- JSON control messages


MESSAGES = [
    Presence("dev-1", True, 120, "0.3.1"),
    Presence("dev-2", False),
    Architecture('{"class_name": "Sequential"}', "ab" * 16, [[3, 3, 1, 8], [8], []], ["k", "b", "s"]),
    RoundAnnouncement(4, 1, ["dev-1", "dev-2"], 1700000000.5),
    RoundAnnouncement(9, 0, [], 0.0, state="finished"),
    Ack(4, "dev-1", True),
    Ack(4, "dev-2", False, "mask digest mismatch"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_json_messages_round_trip(msg):
    data = msg.encode()
    obj = json.loads(data)
    assert obj["v"] == PROTOCOL_VERSION
    assert type(msg).decode(data) == msg


TYPES = {Presence: "presence", Architecture: "architecture", RoundAnnouncement: "round", Ack: "ack"}


@pytest.mark.parametrize("msg", MESSAGES[::2] + [MESSAGES[5]], ids=lambda m: type(m).__name__)
def test_json_messages_reject_bad_envelopes(msg):
    cls = type(msg)
    obj = json.loads(msg.encode())
    other = next(t for c, t in TYPES.items() if c is not cls)
    bad = [
        b"", b"not json", b"\xff\xfe", b"[1, 2]", b"null", b'"presence"', b"[" * 100000,
        json.dumps(dict(obj, type=other)).encode(),
        json.dumps({k: v for k, v in obj.items() if k != "type"}).encode(),
        json.dumps(dict(obj, v=1)).encode(),  # protocol version 1: refused, saying so
        json.dumps(dict(obj, v=2)).encode(),  # version 2 (its update header was longer): refused too
        json.dumps(dict(obj, v=3)).encode(),  # version 3 (its integer values were never entropy-coded): refused too
        json.dumps(dict(obj, v=5)).encode(),
        json.dumps(dict(obj, v="4")).encode(),
        json.dumps({k: v for k, v in obj.items() if k != "v"}).encode(),
        json.dumps(dict(obj, unknown_field=1)).encode(),
        json.dumps({"v": 4, "type": obj["type"]}).encode(),  # required fields missing
        b'{"v": 4, "type": "' + obj["type"].encode() + b'", "x": ' + b"9" * 5000 + b"}",
    ]
    for data in bad:
        expect_codec_error(cls.decode, data)
    with pytest.raises(CodecError, match="speaks protocol version 1, this side speaks 4; upgrade the side"):
        cls.decode(json.dumps(dict(obj, v=1)).encode())
    with pytest.raises(CodecError, match="speaks protocol version 3, this side speaks 4; upgrade the side"):
        cls.decode(json.dumps(dict(obj, v=3)).encode())
    with pytest.raises(CodecError, match="exceeds"):
        cls.decode(b" " * (16 << 20) + msg.encode())


@pytest.mark.parametrize("changes", [
    {"num_samples": -1}, {"num_samples": True}, {"num_samples": "3"}, {"num_samples": 1.5},
    {"num_samples": None}, {"online": 1}, {"online": "true"}, {"device_id": 7}, {"device_id": None},
])
def test_presence_field_checks(changes):
    obj = dict(json.loads(MESSAGES[0].encode()), **changes)
    expect_codec_error(Presence.decode, json.dumps(obj).encode(), match="presence")


@pytest.mark.parametrize("changes", [
    {"shapes": [[3, 3, 1, 8], [8]]}, {"names": ["k"]}, {"shapes": [[-1], [8], []]},
    {"shapes": [[1.5], [8], []]}, {"shapes": "x"}, {"names": "kbs"}, {"shapes": [3, [8], []]},
])
def test_architecture_field_checks(changes):
    obj = dict(json.loads(MESSAGES[2].encode()), **changes)
    expect_codec_error(Architecture.decode, json.dumps(obj).encode(), match="malformed")


# --------------------------------------------------------------------------- task


@pytest.mark.parametrize("downlink", ALL)
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_task_round_trip(downlink, compression):
    task = make_task(downlink.name, compressible=True)
    data = encode_task(task, NAMES, compression)
    kind, h, _ = unpack_frame(data, MAX)
    assert kind == Kind.TASK and h["mask_digest"] == mask_digest(task.masks)
    assert h["section_compression"] == {"none": 0, "zlib": 1, "zstd": 2}[compression]
    got = decode_task(data, NAMES, SHAPES, MAX)
    for f in ("round", "attempt", "architecture_digest", "training", "uplink_precision", "deadline_s",
              "downlink_precision", "session", "update_content", "error_feedback", "stochastic_rounding",
              "compression", "device_sparsity"):
        assert getattr(got, f) == getattr(task, f), f
    assert (got.session, got.update_content, got.error_feedback, got.stochastic_rounding, got.compression) == (
        "s-1f2e", "weights", False, True, "zstd")
    assert same_masks(got.masks, task.masks)
    assert mask_digest(got.masks) == mask_digest(task.masks)
    for w, o, m in zip(task.weights, got.weights, task.masks):
        assert_close(w, o, m, downlink)
    expect_codec_error(decode_task, data, NAMES, SHAPES, len(data) - 1, match="exceeds")


def test_task_defaults_round_trip():
    masks = example_masks(1)
    task = TrainTask(round=0, attempt=0, architecture_digest="", weights=example_tensors(masks), masks=masks,
                     training=TRAINING, uplink_precision="int8", deadline_s=1)
    got = decode_task(encode_task(task, NAMES), NAMES, SHAPES, MAX)
    assert (got.session, got.update_content, got.error_feedback, got.stochastic_rounding, got.compression,
            got.downlink_precision, got.device_sparsity) == ("", "delta", True, False, "none", "float32", None)
    assert got.deadline_s == 1.0 and isinstance(got.deadline_s, float)
    assert got.issued_us is None and "issued_us" not in unpack_frame(encode_task(task, NAMES), MAX)[1]
    issued = dataclasses.replace(task, issued_us=1_796_650_000_123_456)
    assert decode_task(encode_task(issued, NAMES), NAMES, SHAPES, MAX).issued_us == 1_796_650_000_123_456


def test_task_section_is_compressed_only_when_smaller():
    task = make_task("float32")
    plain = encode_task(task, NAMES, "none")
    _, h, body = unpack_frame(plain, MAX)
    assert h["section_compression"] == 0 and h["section_bytes"] == len(body)
    _, h2, body2 = unpack_frame(encode_task(make_task("int8", compressible=True), NAMES, "zlib"), MAX)
    assert h2["section_compression"] == 1 and len(body2) < h2["section_bytes"]


@pytest.mark.parametrize("names,shapes", [
    (NAMES[:-1], SHAPES[:-1]),
    (NAMES + ["x"], SHAPES + [(1,)]),
    (["other"] + NAMES[1:], SHAPES),
    (NAMES, [SHAPES[0][::-1]] + SHAPES[1:]),
    (NAMES, [(int(np.prod(SHAPES[0])),)] + SHAPES[1:]),
    (NAMES, SHAPES[:-1] + [(8, 1)]),
    (NAMES[::-1], SHAPES[::-1]),
])
def test_decode_task_for_another_architecture(names, shapes):
    data = encode_task(make_task("int8"), NAMES)
    expect_codec_error(decode_task, data, names, shapes, MAX)


TASK = encode_task(make_task("int8"), NAMES)


@pytest.mark.parametrize("changes,match", [
    ({"mask_digest": "0" * 32}, "does not match"),
    ({"mask_digest": None}, "mask_digest must be 32 lowercase hex"), ({"mask_digest": "A" * 32}, "lowercase hex"),
    ({"round": -1}, "round"), ({"round": 2**32}, "round"), ({"round": True}, "round"), ({"round": "5"}, "round"),
    ({"round": 5.0}, "round"), ({"attempt": None}, "attempt"), ({"attempt": 2**16}, "attempt must be an integer in "
                                                                                       "[0, 65535]"),
    ({"attempt": 2**16 - 1}, None),
    ({"training": []}, "training"), ({"training": "adam"}, "training"),
    ({"uplink_precision": "int2"}, "unknown precision"), ({"downlink_precision": None}, "must be a string"),
    ({"downlink_precision": "float32"}, None),  # only names the section's precision; the table decides
    ({"architecture_digest": 7}, "must be a string"), ({"session": None}, "session must be a string"),
    ({"error_feedback": 1}, "true or false"), ({"stochastic_rounding": "no"}, "true or false"),
    ({"update_content": "diff"}, "update_content"), ({"compression": "lz4"}, "compression"),
    ({"compression": None}, "compression"),
    ({"deadline_s": "soon"}, "must be a number"), ({"deadline_s": None}, "must be a number"),
    ({"deadline_s": [1]}, "must be a number"), ({"deadline_s": True}, "must be a number"),
    ({"deadline_s": float("inf")}, "finite"), ({"deadline_s": 10**400}, "finite"),
    ({"deadline_s": "12.5"}, "must be a number"), ({"deadline_s": 12}, None),
    ({"section_compression": 3}, "section_compression must be an integer in [0, 2]"),
    ({"section_compression": "zlib"}, "section_compression must be"), ({"section_compression": None}, "must be"),
    ({"section_compression": True}, "must be"), ({"section_compression": 1}, "cannot decompress"),
    ({"section_bytes": 1}, "header says 1"), ({"section_bytes": 10**12}, "exceeds the limit"),
    ({"section_bytes": -1}, "section_bytes must be an integer"), ({"section_bytes": float("inf")}, "must be"),
    ({"section_bytes": float("nan")}, "must be"), ({"section_bytes": "12"}, "must be an integer"),
    ({"section_bytes": [1]}, "must be an integer"),
    ({"device_sparsity": None}, None), ({"device_sparsity": 0}, None), ({"device_sparsity": "0.5"}, "number"),
    ({"device_sparsity": 1.0}, "device_sparsity"), ({"device_sparsity": -0.1}, "device_sparsity"),
    ({"device_sparsity": float("nan")}, "device_sparsity"), ({"device_sparsity": float("inf")}, "device_sparsity"),
    ({"device_sparsity": "x"}, "must be a number"), ({"device_sparsity": [0.5]}, "must be a number"),
    ({"gradient_fraction": 0.25}, None), ({"gradient_fraction": "0.25"}, "must be a number"),
    ({"gradient_fraction": 0}, "gradient_fraction must be in (0, 1]"),
    ({"issued_us": 1_796_000_000_000_000}, None), ({"issued_us": None}, None), ({"issued_us": 0}, None),
    ({"issued_us": -1}, "issued_us must be an integer"), ({"issued_us": 2**63}, "issued_us must be an integer"),
    ({"issued_us": 1.5}, "issued_us must be an integer"), ({"issued_us": "1"}, "issued_us must be an integer"),
    ({"issued_us": True}, "issued_us must be an integer"),
])
def test_decode_task_header_checks(changes, match):
    data = reframe(TASK, changes)
    try:
        got = decode_task(data, NAMES, SHAPES, MAX)
    except CodecError as e:
        if match is not None:
            assert match in e.reason, e.reason
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{type(e).__name__} escaped decode_task: {e}")
    # the few changes that are harmless decode to a valid task
    assert match is None, f"accepted {changes}"
    assert isinstance(got, TrainTask)


@pytest.mark.parametrize("field", ["round", "attempt", "architecture_digest", "training", "uplink_precision",
                                   "deadline_s", "downlink_precision", "session", "update_content",
                                   "error_feedback", "stochastic_rounding", "compression", "device_sparsity",
                                   "gradient_fraction", "mask_digest", "section_compression", "section_bytes"])
def test_decode_task_missing_fields(field):
    with pytest.raises(CodecError, match=f"task header has no '{field}'"):
        decode_task(reframe(TASK, drop=(field,)), NAMES, SHAPES, MAX)


def test_training_settings_give_back_the_json_they_came_from():
    """``as_dict`` is the task header's ``training`` object: the keys in their order, the numbers as
    given, ``clip_norm`` only when set; so the task's bytes do not depend on how it was built."""
    settings = TrainingSettings.from_mapping(TRAINING)
    assert (settings.local_epochs, settings.batch_size, settings.optimizer, settings.learning_rate,
            settings.clip_norm) == (2, 16, "adam", 0.002, None)
    assert list(settings.as_dict().items()) == list(TRAINING.items())
    clipped = {**TRAINING, "learning_rate": 1, "clip_norm": 0.5}
    assert json.dumps(TrainingSettings.from_mapping(clipped).as_dict()) == json.dumps(clipped)
    shuffled = dict(reversed(list(TRAINING.items())))
    assert list(TrainingSettings.from_mapping(shuffled).as_dict()) == list(TRAINING)
    # a dict (as the aggregator passes) and the settings build the same task, byte for byte
    assert make_task().training == settings
    assert encode_task(make_task(training=settings), NAMES) == encode_task(make_task(), NAMES)
    _, h, _ = unpack_frame(encode_task(make_task(training=clipped), NAMES), MAX)
    assert h["training"] == clipped


DROP = object()


@pytest.mark.parametrize(("changes", "match"), [
    ({"local_epochs": DROP}, "training has no key 'local_epochs'"),
    ({"momentum": 0.9}, "training has unknown key 'momentum'"),
    ({"local_epochs": 0}, "training.local_epochs"), ({"local_epochs": 1.0}, "training.local_epochs"),
    ({"batch_size": True}, "training.batch_size"), ({"batch_size": "16"}, "training.batch_size"),
    ({"optimizer": "rmsprop"}, "training.optimizer"), ({"optimizer": None}, "training.optimizer"),
    ({"learning_rate": 0}, "training.learning_rate"), ({"learning_rate": float("nan")}, "training.learning_rate"),
    ({"learning_rate": "0.1"}, "training.learning_rate"), ({"learning_rate": 10**400}, "training.learning_rate"),
    ({"clip_norm": 0.0}, "training.clip_norm"), ({"clip_norm": -1}, "training.clip_norm"),
    ({"clip_norm": float("inf")}, "training.clip_norm"),
])
def test_training_settings_name_the_bad_key(changes, match):
    bad = {k: v for k, v in {**TRAINING, **changes}.items() if v is not DROP}
    with pytest.raises(ValueError, match=match):
        TrainingSettings.from_mapping(bad)
    with pytest.raises(ValueError, match=match):
        make_task(training=bad)
    expect_codec_error(decode_task, reframe(TASK, {"training": bad}), NAMES, SHAPES, MAX, match=match)


def test_training_settings_must_be_a_mapping():
    with pytest.raises(ValueError, match="training must be an object"):
        TrainingSettings.from_mapping([("local_epochs", 1)])


def test_decode_task_missing_mask_digest():
    expect_codec_error(decode_task, reframe(TASK, drop=("mask_digest",)), NAMES, SHAPES, MAX, match="digest")


def test_decode_task_rejects_other_frames():
    u, masks = make_update()
    expect_codec_error(decode_task, encode_update(u, masks), NAMES, SHAPES, MAX, match="expected a task frame")
    expect_codec_error(decode_task, reframe(TASK, kind=Kind.CHUNK), NAMES, SHAPES, MAX, match="task")
    expect_codec_error(decode_task, pack_frame(Kind.TASK, None, b""), NAMES, SHAPES, MAX)
    expect_codec_error(decode_task, b"", NAMES, SHAPES, MAX)


def test_decode_task_rejects_a_section_with_a_bit_flipped_mask():
    task = make_task("float32")
    _, h, body = unpack_frame(encode_task(task, NAMES), MAX)
    other = [m if m is None else m.copy() for m in task.masks]
    other[0].flat[0] = not other[0].flat[0]
    section = encode_self_describing(task.weights, other, NAMES, "float32")
    data = pack_frame(Kind.TASK, dict(h, section_bytes=len(section)), section)
    expect_codec_error(decode_task, data, NAMES, SHAPES, MAX, match="mask digest")


def zlib_bomb(raw: int) -> bytes:
    z = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join([z.compress(chunk) for _ in range(raw >> 20)] + [z.flush()])


def test_decode_task_zip_bomb_with_small_claim_is_refused_cheaply():
    bomb = zlib_bomb(20 << 20)
    data = reframe(TASK, {"section_compression": 1, "section_bytes": 1000}, body=bomb)
    tracemalloc.start()
    err = expect_codec_error(decode_task, data, NAMES, SHAPES, MAX)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "zlib" in err.reason and peak < 4 << 20


def test_decode_task_zip_bomb_with_negative_claim_is_refused_cheaply():
    bomb = zlib_bomb(20 << 20)
    data = reframe(TASK, {"section_compression": 1, "section_bytes": -1}, body=bomb)
    tracemalloc.start()
    expect_codec_error(decode_task, data, NAMES, SHAPES, MAX)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, peak


# --------------------------------------------------------------------------- update


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("content", ["delta", "weights"])
def test_values_only_update_round_trip(precision, compression, content):
    u, masks = make_update(precision.name, content=content, compression=compression, compressible=True)
    data = encode_update(u, masks)
    got = decode_update(data, SHAPES, masks, MAX, device_id="dev-7")  # the topic names the device
    assert (got.round, got.attempt, got.device_id, got.num_samples) == (3, 1, "dev-7", 42)
    assert got.metrics == u.metrics  # all exactly representable in float32
    assert (got.content, got.precision, got.encoding, got.error) == (content, precision.name,
                                                                     Encoding.VALUES_ONLY, "")
    # compressible tensors: the lossless stage is used, but for int4's 64 entropy-coded bytes,
    # which a zstd frame cannot shrink
    assert got.compression == compression or (precision.name, compression) == ("int4", "zstd")
    raw = encode_values_only(u.tensors, masks, precision)
    assert got.compression == compress(raw, compression)[0].name.lower()
    assert got.masks is None and got.mask_digest == mask_digest(masks)
    for t, o, m in zip(u.tensors, got.tensors, masks):
        assert_close(t, o, m, precision)


@pytest.mark.parametrize("precision", ALL)
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_self_describing_update_round_trip(precision, compression):
    u, device_masks = make_update(precision.name, encoding=Encoding.SELF_DESCRIBING, compression=compression,
                                  compressible=True, seed=4)
    data = encode_update(u, device_masks, names=NAMES)
    # the receiver's masks do not matter: the update carries its own
    got = decode_update(data, SHAPES, example_masks(99), MAX, names=NAMES)
    assert got.encoding == Encoding.SELF_DESCRIBING and got.compression == compression
    assert same_masks(got.masks, device_masks) and got.mask_digest == mask_digest(device_masks)
    for t, o, m in zip(u.tensors, got.tensors, device_masks):
        assert_close(t, o, m, precision)
    expect_codec_error(decode_update, data, SHAPES, device_masks, MAX, match="no tensor names")
    expect_codec_error(decode_update, data, SHAPES, device_masks, MAX, names=NAMES[::-1])
    expect_codec_error(decode_update, data, SHAPES[:-1], device_masks, MAX, names=NAMES[:-1])
    with pytest.raises(ValueError):
        encode_update(u, device_masks)  # no names


def test_incompressible_update_travels_uncompressed():
    for method in ("zlib", "zstd"):
        u, masks = make_update("int8", compression=method)  # uniform int8 codes: no redundancy to remove
        u.tensors = [np.random.default_rng(i).uniform(-1, 1, s).astype(np.float32) for i, s in enumerate(SHAPES)]
        data = encode_update(u, masks)
        got = decode_update(data, SHAPES, masks, MAX)
        assert got.compression == "none" and peek_update(data, MAX)[0].compression is Compression.NONE


def test_stochastic_update_uses_the_rng():
    u, masks = make_update("int4")
    a = encode_update(u, masks, stochastic=True, rng=np.random.default_rng(5))
    assert a == encode_update(u, masks, stochastic=True, rng=np.random.default_rng(5))
    got = decode_update(a, SHAPES, masks, MAX)
    for t, o, m in zip(u.tensors, got.tensors, masks):
        sel = np.ones(t.shape, bool) if m is None else m
        assert np.abs(o[sel] - t[sel]).max() <= 2 * quantization_error_bound(t[sel], "int4")


def test_values_only_update_against_another_mask_names_the_digest():
    u, masks = make_update()
    data = encode_update(u, masks)
    other = [m if m is None else m.copy() for m in masks]
    other[0].flat[0] = not other[0].flat[0]
    expect_codec_error(decode_update, data, SHAPES, other, MAX, match="mask digest")
    expect_codec_error(decode_update, data, SHAPES, [None] * 4, MAX, match="mask digest")
    # same bits, another tensor masked: another digest too
    expect_codec_error(decode_update, data, SHAPES, [masks[0], np.ones(5, bool), masks[2], None], MAX,
                       match="mask digest")


def test_self_describing_update_with_a_wrong_digest_in_its_header():
    u, masks = make_update("float16", encoding=Encoding.SELF_DESCRIBING)
    data = encode_update(u, masks, names=NAMES)
    bad = patch(data, DIGEST_AT, bytes(16))
    expect_codec_error(decode_update, bad, SHAPES, masks, MAX, names=NAMES, match="mask digest")


@pytest.mark.parametrize("encoding", list(Encoding))
def test_error_updates_carry_no_tensors(encoding):
    u, masks = make_update(error="out of memory: ünïcode", encoding=encoding, compression="zlib")
    u.num_samples = 0
    data = encode_update(u, masks, names=NAMES)
    h, section = peek_update(data, MAX)
    assert len(section) == 0 and h.raw_section_bytes == 0 and h.compression is Compression.NONE
    # decodes against any mask, without names: there is nothing to align
    got = decode_update(data, SHAPES, [None] * 4, MAX)
    assert got.tensors is None and got.masks is None and got.error == "out of memory: ünïcode"
    assert got.num_samples == 0
    # an error update that carries bytes anyway is refused
    expect_codec_error(decode_update, recrc(data[:-4] + b"\x01" + data[-4:]), SHAPES, masks, MAX,
                       match="carries no tensors")


def test_update_without_samples_is_refused():
    u, masks = make_update()
    u.num_samples = 0
    expect_codec_error(decode_update, encode_update(u, masks), SHAPES, masks, MAX, match="samples")


def test_peek_update():
    u, masks = make_update("int8-channel", content="weights", compression="zstd", compressible=True)
    data = encode_update(u, masks)
    h, section = peek_update(data, MAX, "dev-7")
    assert (h.round, h.attempt, h.device_id, h.num_samples, h.content) == (3, 1, "dev-7", 42, "weights")
    assert h.encoding is Encoding.VALUES_ONLY and h.precision == precision_named("int8-channel")
    assert h.compression is Compression.ZSTD and h.mask_digest == mask_digest(masks)
    assert h.metrics == u.metrics and h.error == ""
    raw = encode_values_only(u.tensors, masks, "int8-channel")
    assert h.raw_section_bytes == len(raw) < update_size_bound(SHAPES, masks, "int8-channel")  # entropy-coded
    assert bytes(section) == compress(raw, "zstd")[1] and data.endswith(bytes(section) + data[-4:])
    expect_codec_error(peek_update, data, len(data) - 1, match="exceeds")
    expect_codec_error(peek_update, TASK, MAX, match="expected an update frame")
    # a receiver that peeked already hands the header on; the update decodes as without it
    peeked = decode_update(data, SHAPES, masks, MAX, peeked=(h, section))
    fresh = decode_update(data, SHAPES, masks, MAX)
    assert all(np.array_equal(a, b) for a, b in zip(peeked.tensors, fresh.tensors))
    assert (peeked.device_id, fresh.device_id, peeked.metrics) == ("dev-7", "", fresh.metrics)


def test_update_layout_and_size():
    u, masks = make_update("int8")
    data = encode_update(u, masks)
    bound = update_size_bound(SHAPES, masks, "int8")
    # round 3, attempt 1, 42 samples: a varint byte each; flags, precision; digest; 3 known metrics
    header = 1 + 1 + 1 + 2 + 16 + 1 + 3 * (1 + 4)
    assert len(data) == FRAME_OVERHEAD + header + len(encode_values_only(u.tensors, masks, "int8"))
    assert len(data) <= FRAME_OVERHEAD + header + bound
    assert len(data) <= bound + 128 and UPDATE_OVERHEAD_BYTES == FRAME_OVERHEAD + 5 + 3 + 5 + 2 + 16 + 1
    assert data[4] == FRAME_VERSION == 4 and struct.unpack_from("<I", data, 6)[0] == 0  # no JSON header
    assert data[BODY:BODY + 3] == bytes([3, 1, 42])
    assert (data[FLAGS_AT], data[PRECISION_AT]) == (0, 2)  # delta, values-only, nothing optional, int8
    assert data[DIGEST_AT:DIGEST_AT + 16].hex() == mask_digest(masks)
    assert data[METRICS_AT:METRICS_AT + 2] == bytes([3, 1])  # 3 metrics, the first "loss" (id 1)
    # the device id does not travel: the update is the same from any device
    assert encode_update(Update(**{**u.__dict__, "device_id": "another"}), masks) == data


def test_update_varints_take_the_bytes_their_values_need():
    u, masks = make_update("int8")
    big = Update(**{**u.__dict__, "round": 300, "attempt": 65535, "num_samples": 2**32 - 1})
    data = encode_update(big, masks)
    assert len(data) == len(encode_update(u, masks)) + 1 + 2 + 4
    assert data[BODY:BODY + 2] == pack_varint(300) == b"\xac\x02"
    h = peek_update(data, MAX)[0]
    assert (h.round, h.attempt, h.num_samples) == (300, 65535, 2**32 - 1)
    # not the shortest form: refused (one value, one encoding)
    overlong = recrc(data[:BODY] + b"\x83\x00" + data[BODY + 2:])
    expect_codec_error(peek_update, overlong, MAX, match="shortest form")
    # an attempt above 65,535
    too_big = recrc(data[:BODY + 2] + pack_varint(65536) + data[BODY + 5:])
    expect_codec_error(peek_update, too_big, MAX, match="exceeds 65535")


@pytest.mark.parametrize("precision", ALL)
def test_update_size_bound_holds_for_every_precision(precision):
    u, masks = make_update(precision.name)
    data = encode_update(u, masks)
    assert len(data) <= update_size_bound(SHAPES, masks, precision.name) + 128


@pytest.mark.parametrize("offset,value,match", [
    (FLAGS_AT, 0x40, "unknown flags"), (FLAGS_AT, 0x80, "unknown flags"), (FLAGS_AT, 0x30, "unknown flags"),
    (PRECISION_AT, 5, "unknown flags"), (PRECISION_AT, 255, "unknown flags"),
], ids=["flag-6", "flag-7", "compression-3", "precision-5", "precision-255"])
def test_peek_update_refuses_unknown_codes(offset, value, match):
    u, masks = make_update()
    data = patch(encode_update(u, masks), offset, bytes([value]))
    expect_codec_error(peek_update, data, MAX, match=match)
    expect_codec_error(decode_update, data, SHAPES, masks, MAX)


def test_update_header_text_checks():
    u, masks = make_update()
    data = encode_update(u, masks)
    expect_codec_error(peek_update, patch(data, METRICS_AT + 1, b"\x09"), MAX, match="metric id 9 is not known")
    expect_codec_error(peek_update, patch(data, METRICS_AT, b"\xff"), MAX)  # 255 metrics: runs into the values
    # a key spelled out, invalid UTF-8; a known key spelled out; the same key twice
    odd = encode_update(Update(**{**u.__dict__, "metrics": {"ab": 1.0}}), masks)
    expect_codec_error(peek_update, patch(odd, METRICS_AT + 3, b"\xff"), MAX, match="UTF-8")
    spelled = encode_update(Update(**{**u.__dict__, "metrics": {"lost": 1.0}}), masks)
    expect_codec_error(peek_update, patch(spelled, METRICS_AT + 6, b"s"), MAX, match="travels as id 1")
    twice = patch(data, METRICS_AT + 6, b"\x01")  # the second metric's id: "loss" again
    expect_codec_error(peek_update, twice, MAX, match="appears twice")
    # the error text: a length past the end, not UTF-8, empty though flagged
    short = Update(round=1, attempt=0, device_id="d", num_samples=1, error="x")
    e = encode_update(short, [None])
    assert e[-4 - 2:-4] == b"\x01x"  # its length varint, then the text
    expect_codec_error(peek_update, patch(e, len(e) - 6, b"\x02"), MAX, match="ends early")
    expect_codec_error(peek_update, patch(e, len(e) - 5, b"\xff"), MAX, match="UTF-8")
    empty = recrc(e[:-6] + b"\x00" + e[-4:])
    expect_codec_error(peek_update, empty, MAX, match="text is empty")


def test_values_only_update_section_length_checks():
    u, masks = make_update("float32")
    data = encode_update(u, masks)
    expect_codec_error(decode_update, recrc(data[:-5] + data[-4:]), SHAPES, masks, MAX, match="expected")
    expect_codec_error(decode_update, recrc(data[:-4] + b"\0" + data[-4:]), SHAPES, masks, MAX, match="expected")
    # compressed: the raw length field must be the expected size, and the stream must produce it
    uz, _ = make_update("float32", compression="zlib", compressible=True)
    dz = encode_update(uz, masks)
    h, section = peek_update(dz, MAX)
    raw = pack_varint(h.raw_section_bytes)
    raw_at = len(dz) - 4 - len(section) - len(raw)
    assert dz[raw_at:raw_at + len(raw)] == raw
    for claim in (h.raw_section_bytes + 1, h.raw_section_bytes - 1, 0, 2**32 - 1):
        claimed = recrc(dz[:raw_at] + pack_varint(claim) + dz[raw_at + len(raw):])
        expect_codec_error(decode_update, claimed, SHAPES, masks, MAX, match="values section is")  # float32: exact
    # int8: the raw length may be anything up to the layout's packed size; the stream must produce it
    u8, _ = make_update("int8", compression="zlib", compressible=True)
    d8 = encode_update(u8, masks)
    h8, section8 = peek_update(d8, MAX)
    raw8 = pack_varint(h8.raw_section_bytes)
    at8 = len(d8) - 4 - len(section8) - len(raw8)
    assert h8.raw_section_bytes < update_size_bound(SHAPES, masks, "int8")  # entropy-coded
    for claim, match in ((update_size_bound(SHAPES, masks, "int8") + 1, "values section is"),
                         (h8.raw_section_bytes + 1, "decompress"), (h8.raw_section_bytes - 1, "decompress")):
        claimed = recrc(d8[:at8] + pack_varint(claim) + d8[at8 + len(raw8):])
        expect_codec_error(decode_update, claimed, SHAPES, masks, MAX, match=match)
    # another compression code than the stream's (zstd for zlib)
    assert dz[FLAGS_AT] == 0x10
    expect_codec_error(decode_update, patch(dz, FLAGS_AT, b"\x20"), SHAPES, masks, MAX, match="decompress")


def test_update_metrics_and_unicode_ids():
    u = Update(round=2**32 - 1, attempt=2**16 - 1, device_id="dévice-ü", num_samples=2**32 - 1,
               metrics={"loss": 1 / 3, "näme": -2.5, "inf": float("inf")}, tensors=[np.ones(3, np.float32)],
               precision="float32")
    got = decode_update(encode_update(u, [None]), [(3,)], [None], MAX, device_id="dévice-ü")
    assert (got.round, got.attempt, got.device_id, got.num_samples) == (2**32 - 1, 2**16 - 1, "dévice-ü", 2**32 - 1)
    assert got.metrics["loss"] == pytest.approx(1 / 3, rel=1e-7) and got.metrics["näme"] == -2.5
    assert got.metrics["inf"] == float("inf")


@pytest.mark.parametrize("metrics,error", [({"é" * 128: 1.0}, ""), ({}, "é" * 40000)],
                         ids=["metric-name", "error-text"])
def test_long_non_ascii_texts_still_decode(metrics, error):
    u = Update(round=1, attempt=0, device_id="d", num_samples=1, metrics=metrics, error=error,
               tensors=None if error else [np.ones(2, np.float32)], precision="float32")
    decode_update(encode_update(u, [None]), [(2,)], [None], MAX)


def test_encode_update_argument_errors():
    u, masks = make_update()
    with pytest.raises(ValueError):
        encode_update(Update(**{**u.__dict__, "precision": "int3"}), masks)
    with pytest.raises(ValueError):
        encode_update(Update(**{**u.__dict__, "content": "diff"}), masks)
    with pytest.raises(ValueError):
        encode_update(u, masks[:-1])


# --------------------------------------------------------------------------- property tests

UPDATE_MASKS = example_masks()
TARGETS = {
    **{f"update-{p.name}": (encode_update(make_update(p.name)[0], UPDATE_MASKS), "update") for p in ALL},
    "update-zlib": (encode_update(make_update("int8", compression="zlib", compressible=True)[0], UPDATE_MASKS),
                    "update"),
    "update-zstd": (encode_update(make_update("float16", compression="zstd", compressible=True)[0], UPDATE_MASKS),
                    "update"),
    "update-sd": (encode_update(make_update("int4", encoding=Encoding.SELF_DESCRIBING)[0], UPDATE_MASKS,
                                names=NAMES), "update"),
    "update-sd-zlib": (encode_update(make_update("int8-channel", encoding=Encoding.SELF_DESCRIBING,
                                                 compression="zlib", compressible=True)[0],
                                     UPDATE_MASKS, names=NAMES), "update"),
    "update-error": (encode_update(make_update(error="boom")[0], UPDATE_MASKS), "update"),
    "task-none": (encode_task(make_task("int8"), NAMES, "none"), "task"),
    "task-zlib": (encode_task(make_task("int4", compressible=True), NAMES, "zlib"), "task"),
    "task-zstd": (encode_task(make_task("float16", compressible=True), NAMES, "zstd"), "task"),
}


def test_property_targets_are_valid_and_compressed_where_meant():
    for name, (data, what) in TARGETS.items():
        if what == "update":
            got = decode_update(data, SHAPES, UPDATE_MASKS, MAX, names=NAMES)
            if "zlib" in name or "zstd" in name:
                assert got.compression in name
        else:
            assert unpack_frame(data, MAX)[1]["section_compression"] == (0 if "none" in name else
                                                                         1 if "zlib" in name else 2)
            decode_task(data, NAMES, SHAPES, MAX)


def decode_any(data: bytes, what: str) -> None:
    if what == "update":
        decode_or_codec_error(decode_update, data, SHAPES, UPDATE_MASKS, MAX)
        decode_or_codec_error(decode_update, data, SHAPES, UPDATE_MASKS, MAX, names=NAMES)
    else:
        decode_or_codec_error(decode_task, data, NAMES, SHAPES, MAX)


@PROP
@given(data=st.binary(max_size=400))
def test_random_bytes_decode_or_raise_codec_error(data):
    decode_any(data, "update")
    decode_any(data, "task")
    decode_or_codec_error(peek_update, data, MAX)


def valid_frame(kind: int, head: bytes, body: bytes) -> bytes:
    data = PREFIX.pack(b"FPRN", FRAME_VERSION, kind, len(head)) + head + body
    return data + CRC.pack(zlib.crc32(data))


@PROP
@given(body=st.binary(max_size=300), fixed=st.none() | st.tuples(
    st.integers(0, 2**32 - 1), st.integers(0, 2**16 - 1), st.integers(0, 3), st.integers(0, 0x3F),
    st.integers(0, 5), st.booleans()))
def test_random_update_bodies_with_valid_frames(body, fixed):
    """Frames that pass the checksum, with a plausible or random binary header."""
    if fixed is not None:
        n, attempt, samples, flags, pid, real_digest = fixed
        digest = bytes.fromhex(mask_digest(UPDATE_MASKS)) if real_digest else bytes(16)
        body = pack_varint(n) + pack_varint(attempt) + pack_varint(samples) + bytes([flags, pid]) + digest + body
    decode_any(valid_frame(Kind.UPDATE, b"", body), "update")


json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
                | st.floats() | st.sampled_from(["int8", "float32", "delta", "weights", "zlib", "zstd", "none"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@PROP
@given(target=st.sampled_from(["task-none", "task-zlib", "task-zstd"]), data=st.data())
def test_task_header_fuzz_decodes_or_raises_codec_error(target, data):
    _, h, body = unpack_frame(TARGETS[target][0], MAX)
    h = dict(h)
    size = int(h["section_bytes"])
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(h) + ["extra"]))
        if data.draw(st.booleans()) and key in h:
            del h[key]
        else:
            h[key] = data.draw(json_values | st.integers(-2, 2 * size))
    decode_any(pack_frame(Kind.TASK, h, bytes(body)), "task")


@settings(PROP, max_examples=300)
@given(target=st.sampled_from(sorted(TARGETS)), fix_crc=st.booleans(), data=st.data())
def test_mutated_messages_decode_or_raise_codec_error(target, fix_crc, data):
    original, what = TARGETS[target]
    mutated = original
    for _ in range(data.draw(st.integers(1, 2))):
        if mutated:
            mutated = mutate(mutated, data.draw)
    assume(mutated != original)
    if fix_crc and len(mutated) >= FRAME_OVERHEAD:
        mutated = recrc(mutated)  # past the checksum: the header, table and length checks must hold
    else:
        # the checksum is stale: the frame check alone refuses it
        with pytest.raises(CodecError):
            unpack_frame(mutated, MAX)
    decode_any(mutated, what)


@PROP
@given(target=st.sampled_from([k for k in TARGETS if k.startswith("update")]), data=st.data())
def test_header_byte_mutations_with_fixed_crc(target, data):
    """Concentrate on the binary update header (first ~80 bytes), checksum recomputed."""
    original, _ = TARGETS[target]
    i = data.draw(st.integers(BODY, min(len(original) - 5, BODY + 80)))
    new = data.draw(st.binary(min_size=1, max_size=4))
    decode_any(patch(original, i, new[: len(original) - 4 - i]), "update")


@st.composite
def layouts(draw):
    n = draw(st.integers(1, 4))
    shapes, masks, tensors = [], [], []
    for _ in range(n):
        shape = tuple(draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
        shapes.append(shape)
        if draw(st.booleans()):
            masks.append(None)
        else:
            density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.95, 1.0]))
            masks.append(np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(shape) < density)
        tensors.append(draw(hnp.arrays(
            np.float32, shape, elements=st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=32))))
    return shapes, masks, tensors


@PROP
@given(layout=layouts(), precision=st.sampled_from(ALL), compression=st.sampled_from(["none", "zlib", "zstd"]),
       encoding=st.sampled_from(list(Encoding)))
def test_random_layouts_round_trip(layout, precision, compression, encoding):
    shapes, masks, tensors = layout
    names = [f"layer{i}/w" for i in range(len(shapes))]
    u = Update(round=1, attempt=0, device_id="d", num_samples=5, tensors=tensors, precision=precision.name,
               encoding=encoding, compression=compression)
    data = encode_update(u, masks, names=names)
    receiver_masks = masks if encoding == Encoding.VALUES_ONLY else [None] * len(masks)
    got = decode_update(data, shapes, receiver_masks, MAX, names=names)
    if encoding == Encoding.VALUES_ONLY and compression == "none":
        assert len(data) <= update_size_bound(shapes, masks, precision.name) + 128
    if encoding == Encoding.SELF_DESCRIBING:
        assert same_masks(got.masks, masks)
    for t, o, m in zip(tensors, got.tensors, masks):
        assert_close(t, o, m, precision)
    # the same layout as a task: the masks travel in the frame
    task = TrainTask(round=2, attempt=1, architecture_digest="x", weights=tensors, masks=list(masks), training=TRAINING,
                     uplink_precision="int8", deadline_s=1.0, downlink_precision=precision.name)
    back = decode_task(encode_task(task, names, compression), names, shapes, MAX)
    assert same_masks(back.masks, masks)
    for t, o, m in zip(tensors, back.weights, masks):
        assert_close(t, o, m, precision)
