"""Assertions shared by the codec and protocol tests: a decoder answers CodecError or nothing."""

from __future__ import annotations

import pytest

from converters.errors import CodecError


def expect_codec_error(fn, *args, match: str | None = None, **kwargs) -> CodecError:
    """``fn`` must refuse with a CodecError (whose reason contains ``match``), nothing else."""
    try:
        fn(*args, **kwargs)
    except CodecError as e:
        if match is not None:
            assert match in e.reason, e.reason
        return e
    except Exception as e:  # noqa: BLE001 - the point of the helper
        pytest.fail(f"{type(e).__name__} escaped {fn.__name__}: {e}")
    pytest.fail(f"{fn.__name__} accepted bad input")


def decode_or_codec_error(fn, *args, **kwargs):
    """The decoded value, or None when ``fn`` refused with a CodecError (any other error fails)."""
    try:
        return fn(*args, **kwargs)
    except CodecError:
        return None
