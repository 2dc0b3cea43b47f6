"""docs/protocol.md's worked examples, read from the document and checked byte for byte.

Every block of bytes in section 17 is parsed out of the page here: the `xxd` dumps, the `hex`
blocks, the task header, the byte strings of the mask-coding table. The reference implementation
must decode each to what the text says and, where the reference encoder makes the same choices,
encode the described message to exactly those bytes; so the document and the code cannot drift.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedprune.converters.frame import PREFIX
from fedprune.converters.mask_coding import MaskMethod, decode_mask, mask_digest
from fedprune.converters.protocol import Ack, TrainTask, Update, decode_task, decode_update, encode_task, encode_update
from fedprune.converters.quantize import decode_values, encode_values
from fedprune.converters.signing import SigningKey, VerifyKey, open_signed, sign_message
from fedprune.converters.codec import decode_self_describing

DOC = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``###`` subsection whose heading starts with ``title``."""
    match = re.search(rf"^### {re.escape(title)}.*?$(.*?)(?=^##)", DOC, re.S | re.M)
    assert match, f"no subsection {title!r} in docs/protocol.md"
    return match.group(1)


def blocks(text: str, info: str) -> list[str]:
    """The fenced code blocks of ``text`` whose info string is ``info``."""
    return re.findall(rf"^```{info}\n(.*?)^```", text, re.S | re.M)


def xxd(block: str) -> bytes:
    """The bytes of an ``xxd`` dump: the hex between the offset and the two spaces before the text,
    each line's offset checked against the bytes before it."""
    out = bytearray()
    for line in block.splitlines():
        offset, rest = line.split(": ", 1)
        assert int(offset, 16) == len(out), f"offset {offset} after {len(out)} bytes"
        out += bytes.fromhex(rest[:39].replace(" ", ""))
    return bytes(out)


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(re.sub(r"\s+", "", text))


# --- 17.1 ---------------------------------------------------------------------------------------

MASK_171 = np.array([[1, 0, 1], [0, 1, 0]], bool)


def test_17_1_the_values_only_update_decodes_and_the_encoder_writes_exactly_it():
    text = section("17.1")
    (dump,) = blocks(text, "xxd")
    data = xxd(dump)
    assert len(data) == int(re.search(r"The (\d+)-byte payload", text).group(1))
    digest = re.search(r"= `([0-9a-f]{32})`", text).group(1)
    assert mask_digest([MASK_171, None]) == digest
    u = decode_update(data, [(2, 3), (2,)], [MASK_171, None], 1 << 20, device_id="pi-07")  # from the topic
    assert (u.round, u.attempt, u.device_id, u.num_samples, u.metrics, u.precision) == (
        3, 1, "pi-07", 412, {"loss": 0.5}, "int8")
    np.testing.assert_allclose(u.tensors[0], [[0.503937, 0, -0.2519685], [0, 1.0, 0]], rtol=1e-6)
    np.testing.assert_allclose(u.tensors[1], [0.1007874, -0.2], rtol=1e-6)
    delta = [np.array([[0.5, 0, -0.25], [0, 1.0, 0]], np.float32), np.array([0.1, -0.2], np.float32)]
    assert encode_update(Update(3, 1, "pi-07", 412, {"loss": 0.5}, delta, precision="int8"),
                         [MASK_171, None]) == data
    crc = re.search(r"CRC-32 `0x([0-9A-F]{8})`", text).group(1)
    assert int.from_bytes(data[-4:], "little") == int(crc, 16)
    # the table's rows: each names the bytes at its offset
    for offset, shown in re.findall(r"^\| 0x([0-9A-F]{2}) \| `([0-9A-F ]+)`", text, re.M):
        assert data[int(offset, 16):int(offset, 16) + len(hexbytes(shown))] == hexbytes(shown), offset


def test_17_1_the_int8_channel_section():
    (block,) = blocks(section("17.1"), "hex")
    section_bytes = hexbytes(block)
    kept = np.array([0.5, -0.25, 1.0], np.float32)
    channels = np.array([0, 2, 1])
    assert encode_values(kept, "int8-channel", channels=channels, n_channels=3) == section_bytes
    decoded = decode_values(section_bytes, 3, "int8-channel", channels=channels, n_channels=3)
    np.testing.assert_allclose(decoded, kept, rtol=1e-6)


# --- 17.2 ---------------------------------------------------------------------------------------

NAMES_172, SHAPES_172 = ["d/kernel", "d/bias"], [(8, 8), (8,)]


def _task_172() -> tuple[bytes, str, str]:
    """The task frame the document describes, put together from its pieces."""
    text = section("17.2")
    (section_hex,) = blocks(text, "hex")
    (header,) = blocks(text, "json")
    prefix = hexbytes(re.search(r"the\s+frame is `([0-9A-F ]+)`", text).group(1))
    crc = hexbytes(re.search(r"then the CRC `([0-9A-F ]+)`", text).group(1))
    frame = prefix + header.strip().encode() + hexbytes(section_hex) + crc
    return frame, header.strip(), text


def test_17_2_the_self_describing_section_decodes_to_the_tensors_described():
    frame, header, text = _task_172()
    sec = frame[PREFIX.size + len(header.encode()):-4]
    assert len(sec) == int(re.search(r"The (\d+)-byte section", text).group(1))
    d = decode_self_describing(sec, expected=list(zip(NAMES_172, SHAPES_172)))
    kernel = d.tensors[0].ravel()
    assert sorted(np.flatnonzero(d.masks[0].ravel())) == [5, 20, 50] and d.masks[1] is None
    np.testing.assert_allclose(kernel[[5, 20, 50]], [0.7, -0.4, 0.1], rtol=1e-6)  # -0.35 rounds to -4 x 0.1
    np.testing.assert_allclose(d.tensors[1], [0.1, -0.1, 0, 0.2, 0, 0, 0, -0.7], rtol=1e-6)
    coded = hexbytes(re.search(r"the coded mask is `([0-9A-F ]+)`", text).group(1))
    assert sec.find(coded) > 0
    mask = decode_mask(MaskMethod.GOLOMB_GAPS, coded, 64, 3)
    assert list(np.flatnonzero(mask)) == [5, 20, 50]


def test_17_2_the_task_frame_decodes_and_its_header_is_what_the_encoder_writes():
    frame, header, text = _task_172()
    assert len(header.encode()) == int(re.search(r"`H = (\d+)`", text).group(1))
    assert len(frame) == int(re.search(r"(\d+) bytes\. \(The reference", text).group(1))
    task = decode_task(frame, NAMES_172, SHAPES_172, 1 << 20)
    assert (task.round, task.attempt, task.downlink_precision, task.gradient_fraction) == (3, 1, "int4", None)
    again = encode_task(TrainTask(3, 1, "0" * 32, task.weights, task.masks, task.training, "int8", 120.0, "int4",
                                  "5f2c0e1a9b3d4c6e"), NAMES_172)
    ours = json.loads(again[PREFIX.size:PREFIX.size + int.from_bytes(again[6:10], "little")])
    # the encoder picks INDEX_LIST for this mask, as the text says: only the section differs
    encoder_bytes = int(re.search(r'would write the same header with `"section_bytes":(\d+)`', text).group(1))
    assert ours == {**json.loads(header), "section_bytes": encoder_bytes}
    same = header[:header.rindex('"section_bytes":')].encode()  # byte for byte, key order included
    assert again[PREFIX.size:PREFIX.size + len(same)] == frame[PREFIX.size:PREFIX.size + len(same)] == same


# --- 17.3 ---------------------------------------------------------------------------------------

ROW = re.compile(r"^\| (\d+), (all but )?\{([\d, ]+)\} \| ([A-Z_]+)(?:, k = \d+)? \| `([0-9A-F ]+)`", re.M)


def test_17_3_every_mask_coding_in_the_table_decodes_to_its_mask():
    rows = ROW.findall(section("17.3"))
    assert len(rows) == 8
    for n, complement, positions, method, coded in rows:
        n = int(n)
        listed = [int(p) for p in positions.split(",")]
        kept = sorted(set(range(n)) - set(listed)) if complement else listed
        mask = decode_mask(MaskMethod[method], hexbytes(coded), n, len(kept))
        assert list(np.flatnonzero(mask)) == kept, (n, method)


# --- 17.4 ---------------------------------------------------------------------------------------


def test_17_4_the_signed_envelope_opens_and_the_signer_writes_exactly_it():
    text = section("17.4")
    (dump,) = blocks(text, "xxd")
    (message,) = blocks(text, "json")
    envelope = xxd(dump)
    seed = bytes.fromhex(re.search(r"seed `([0-9a-f]{64})`", text).group(1))
    public = bytes.fromhex(re.search(r"public key\s+`([0-9a-f]{64})`", text).group(1))
    key_text = re.search(r"`(ed25519:[A-Za-z0-9+/=]{44})`", text).group(1)
    topic = re.search(r"on topic\s+`([^`]+)`", text).group(1)
    key = SigningKey.from_seed(seed)
    assert key.public.raw == public and VerifyKey.from_text(key_text) == key.public
    assert key.public.key_id.hex() == re.search(r"key id .*? is `([0-9a-f]{16})`", text, re.S).group(1)
    payload = message.strip().encode()
    assert payload == Ack(3, "pi-07", True).encode()
    assert len(envelope) == int(re.search(r"The\s+(\d+)-byte envelope", text).group(1))
    assert open_signed(topic, envelope, key.public, 1 << 20) == payload
    assert sign_message(topic, payload, key) == envelope
    other = re.search(r"\(say `([^`]+)`\)", text).group(1)
    with pytest.raises(Exception, match="signature does not match"):
        open_signed(other, envelope, key.public, 1 << 20)
    for offset, shown in re.findall(r"^\| 0x([0-9A-F]{2}) \| `([0-9A-F ]+)`", text, re.M):
        assert envelope[int(offset, 16):int(offset, 16) + len(hexbytes(shown))] == hexbytes(shown), offset


def test_the_documented_signature_overhead_is_the_real_one():
    overhead = int(re.search(r"\*\*Cost\.\*\* (\d+) bytes per message", DOC).group(1))
    key = SigningKey.from_seed(bytes(32))
    assert len(sign_message("t", b"x" * 1000, key)) - 1000 == overhead
