"""Shared fixtures: real MQTT brokers (embedded amqtt and a private Mosquitto)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent
# `brokers` (this folder) and the project packages (repo root) importable without installing.
for _path in (str(_TESTS_DIR), str(_REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from brokers import MosquittoProcess, mosquitto_available  # noqa: E402


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def mosquitto_broker() -> Iterator[MosquittoProcess]:
    """A running Mosquitto on a free loopback port (the object, for restart/kill tests).

    Skipped when mosquitto is not installed, except in CI (env CI set), where it fails: the
    Mosquitto half of the suite must not vanish silently there.
    """
    if not mosquitto_available():
        msg = "mosquitto is not installed (apt-get install mosquitto); Mosquitto tests need it"
        if _in_ci():
            pytest.fail(f"{msg}, and CI is set: install it in the CI image", pytrace=False)
        pytest.skip(msg)
    broker = MosquittoProcess()
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto_url(mosquitto_broker: MosquittoProcess) -> str:
    """URL (mqtt://127.0.0.1:PORT) of a private Mosquitto for this test."""
    return mosquitto_broker.url


@pytest.fixture
def embedded_broker_url() -> Iterator[str]:
    """URL of an in-process amqtt broker (fedprune.aggregator.embedded_broker) for this test."""
    from fedprune.aggregator.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """The same test against both brokers: code that passes on amqtt can fail on Mosquitto."""
    if request.param == "embedded":
        return request.getfixturevalue("embedded_broker_url")
    return request.getfixturevalue("mosquitto_url")
