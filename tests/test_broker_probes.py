"""One probe suite, both brokers: the embedded one under ``--broker-dir`` rules and Mosquitto with
``init-broker``'s config. Each probe (``scripts/probe_broker.py``, which also runs them as a
script) tries a way in without a valid login, a take-over of another client's session (before
and after authentication), or a read or write of another device's topics, retained messages
included; it passes when the broker refuses it and the clients under attack keep working."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from probe_broker import BROKERS, PROBES, ProbeBench  # noqa: E402

from brokers import mosquitto_available  # noqa: E402


@pytest.fixture(scope="module", params=BROKERS)
def bench(request, tmp_path_factory):
    if request.param == "mosquitto" and not mosquitto_available():
        pytest.skip("needs mosquitto and mosquitto_passwd")
    with ProbeBench(request.param, tmp_path_factory.mktemp(request.param)) as b:
        yield b


@pytest.mark.parametrize("probe", PROBES)
def test_the_broker_refuses_it_and_its_clients_keep_working(bench, probe):
    result = bench.run(probe)
    assert result.refused, f"{bench.kind}: {probe} was not refused: {result.detail}"


def test_the_embedded_broker_without_logins_warns_when_it_binds_beyond_loopback(caplog):
    from fedprune.aggregator.embedded_broker import EmbeddedBroker

    with caplog.at_level("WARNING", logger="fedprune.aggregator.embedded_broker"):
        with EmbeddedBroker("127.0.0.1", 0):
            pass
        assert "without a login" not in caplog.text
        with EmbeddedBroker("0.0.0.0", 0):
            pass
    assert "takes anyone who can reach it, without a login" in caplog.text and "--broker-dir" in caplog.text
