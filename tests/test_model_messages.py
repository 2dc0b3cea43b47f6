"""Model files on the wire: the trainable TFLite file and the final model (frame kinds 4 and 5),
the presence's trainer fields, and retained chunks that a device joining late still gets whole."""

from __future__ import annotations

import hashlib
import json
import threading
import zlib

import numpy as np
import pytest

from fedprune.converters.chunking import chunk_source, retained_chunk_topics, retained_subscriptions
from fedprune.converters.errors import CodecError
from fedprune.converters.frame import pack_frame
from fedprune.converters.model_messages import (
    FinalModel,
    TrainableModel,
    decode_final_model,
    decode_trainable_model,
    encode_final_model,
    encode_trainable_model,
)
from fedprune.converters.protocol import PROTOCOL_VERSION, Kind, Presence
from fedprune.transport import MqttSession

DIGEST = "0123456789abcdef" * 2
FILE = bytes(40_000) + bytes(range(256)) * 40  # compressible, like a trainable file's zero variables


def test_model_files_round_trip_compressed_and_checked():
    trainable = TrainableModel(DIGEST, 16, FILE)
    wire = encode_trainable_model(trainable)
    assert len(wire) < len(FILE) // 4  # zlib: zero-filled variables shrink
    assert decode_trainable_model(wire) == trainable
    final = FinalModel(15, "int8", 0.8, 0.9611, DIGEST, FILE)
    assert decode_final_model(encode_final_model(final)) == final
    assert decode_final_model(encode_final_model(FinalModel(3, "float32", 0.0, None, DIGEST, b"x"))).accuracy is None
    issued = FinalModel(15, "int8", 0.8, 0.9611, DIGEST, FILE, issued_us=1_796_650_000_000_001)
    assert decode_final_model(encode_final_model(issued)) == issued and final.issued_us is None
    for bad in (-1, 2**63, 1.5, "1", True):
        with pytest.raises(CodecError, match="final model issued_us must be an integer"):
            decode_final_model(_frame(Kind.FINAL_MODEL, issued_us=bad))
    with pytest.raises(CodecError, match="expected a trainable model frame"):
        decode_trainable_model(encode_final_model(final))


def _frame(kind: Kind, **header) -> bytes:
    base = {"architecture_digest": DIGEST, "batch_size": 16, "round": 1, "precision": "int8", "sparsity": 0.5,
            "accuracy": 0.9, "size": len(FILE), "sha256": hashlib.sha256(FILE).hexdigest(), "compression": 1}
    return pack_frame(kind, {**base, **header}, zlib.compress(FILE))


@pytest.mark.parametrize("header, match", [
    ({"sha256": "0" * 64}, "does not match its sha256"),
    ({"size": len(FILE) - 1}, "decompressed"),
    ({"size": 0}, "size must be"),
    ({"compression": 7}, "unknown compression"),
    ({"architecture_digest": "xyz"}, "architecture_digest"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "batch_size"),
])
def test_a_trainable_file_that_is_not_the_one_named_is_refused(header, match):
    assert decode_trainable_model(_frame(Kind.TRAINABLE_MODEL)).content == FILE
    with pytest.raises(CodecError, match=match):
        decode_trainable_model(_frame(Kind.TRAINABLE_MODEL, **header))


@pytest.mark.parametrize("header, match", [
    ({"precision": "float16"}, "precision"), ({"round": -1}, "round"), ({"sparsity": 1.5}, "sparsity"),
    ({"accuracy": "high"}, "accuracy"),
])
def test_a_bad_final_model_header_is_refused(header, match):
    with pytest.raises(CodecError, match=match):
        decode_final_model(_frame(Kind.FINAL_MODEL, **header))


def test_mutated_model_messages_decode_or_raise_codec_error():
    wire = encode_final_model(FinalModel(2, "int8", 0.5, 0.9, DIGEST, FILE))
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(wire)
        for i in rng.integers(0, len(data), int(rng.integers(1, 4))):
            data[i] = int(rng.integers(0, 256))
        try:
            decode_final_model(bytes(data))
        except CodecError:
            pass
    with pytest.raises(CodecError, match="exceeds the limit|size must be"):
        decode_final_model(wire, max_file_bytes=100)


def test_presence_says_what_the_device_trains_with_and_old_presences_still_decode():
    p = Presence("pi-07", True, 412, "0.1.0", "litert", "ai-edge-litert 2.3.0")
    assert Presence.decode(p.encode()) == p
    old = json.dumps({"v": PROTOCOL_VERSION, "type": "presence", "device_id": "pi-07", "online": True,
                      "num_samples": 4, "agent_version": "0.1.0"}).encode()  # from an agent before the field
    assert Presence.decode(old).trainer == "keras"  # agents before the field trained with Keras only
    for bad in ({"trainer": "pytorch"}, {"trainer": 1}, {"runtime": 5}, {"runtime": "x" * 201}):
        with pytest.raises(CodecError, match="presence"):
            Presence.decode(json.dumps({**json.loads(old), **bad}).encode())


def test_retained_chunk_topics():
    assert retained_chunk_topics("r/model/trainable", 3) == ["r/model/trainable", "r/model/trainable/chunk/1",
                                                            "r/model/trainable/chunk/2"]
    assert retained_subscriptions("r/x") == ["r/x", "r/x/chunk/+"]
    assert chunk_source("r/x/chunk/12") == "r/x" and chunk_source("r/x") == "r/x"
    for other in ("r/x/chunk/a", "chunk/1", "r/x/chunk/", "r/x/chunks/1", "r/x/chunk/١"):
        assert chunk_source(other) == other


def _late_joiner(url: str, topic: str, wanted: int, **limits) -> list[tuple[str, bytes]]:
    """What a device that connects now receives on ``topic`` (whole messages), waiting for ``wanted``."""
    got: list[tuple[str, bytes]] = []
    enough = threading.Event()

    def on_message(t, payload):
        got.append((t, payload))
        if len(got) >= wanted:
            enough.set()

    if wanted == 0:
        enough.set()

    session = MqttSession(url, f"late-{wanted}-{len(topic)}", subscriptions=retained_subscriptions(topic),
                          on_message=on_message, **limits).start(10)
    try:
        enough.wait(10)
        threading.Event().wait(1.0)  # anything else retained arrives too
    finally:
        session.stop()
    return got


def test_a_retained_chunked_message_reaches_a_device_that_joins_later(broker_url):
    limits = dict(max_payload_bytes=1000, max_message_bytes=20_000)
    topic = "fedprune/v1/default/model/trainable"
    big = bytes(range(256)) * 40  # 10,240 bytes: 11 chunks
    pub = MqttSession(broker_url, "files-pub", **limits).start(10)
    try:
        pub.publish_retained(topic, big).wait_for_publish(5)
        assert _late_joiner(broker_url, topic, 1, **limits) == [(topic, big)]
        # A shorter message replaces it: the chunks the longer one left are cleared or orphaned.
        small = b"y" * 2500
        pub.publish_retained(topic, small).wait_for_publish(5)
        assert _late_joiner(broker_url, topic, 1, **limits) == [(topic, small)]
        pub.publish_retained(topic, b"z" * 10).wait_for_publish(5)  # fits one payload
        assert _late_joiner(broker_url, topic, 1, **limits) == [(topic, b"z" * 10)]
        pub.publish_retained(topic, b"").wait_for_publish(5)  # cleared: a new run has no file yet
        assert _late_joiner(broker_url, topic, 0, **limits) == []
    finally:
        pub.stop()
