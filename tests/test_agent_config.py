"""The agent's config file: the shipped example loads, typos and bad values name the key, flags win."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from fedprune.edge_agent.config import AgentConfig, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_example_is_valid():
    config = load_config(ROOT / "deploy" / "agent.toml").check()
    assert config.device.id == "pi-07" and config.broker.url.startswith("mqtt://")
    assert config.budget_limits.max_train_memory_mb == 900 and config.budget_limits.max_round_s == 300
    assert config.state_dir == Path("/var/lib/fedprune/state") and config.model.export == "int8"


@pytest.mark.parametrize("raw,named", [
    ({"budget": {}}, "unknown section [budget]"),
    ({"budgets": {"max_round": 3}}, "unknown key 'budgets.max_round'"),
    ({"budgets": {"max_round_s": "ten"}}, "budgets.max_round_s must be a number"),
    ({"budgets": {"max_round_s": -1}}, "budgets.max_round_s must be > 0"),
    ({"budgets": {"max_train_memory_mb": 0}}, "budgets.max_train_memory_mb must be > 0"),
    ({"model": {"export": "int4"}}, "model.export must be one of"),
    ({"broker": {"url": "http://x"}}, "broker.url"),
    ({"broker": {"url": "mqtt://u:p@x"}}, "must not hold credentials"),
    ({"broker": {"max_payload_bytes": 10}}, "broker.max_payload_bytes must be >= 1024"),
    ({"broker": {"password_file": "/etc/hostname"}}, "broker.username is not"),
    ({"broker": {"url": "mqtt://x", "ca_file": "/etc/hostname"}}, "needs a TLS URL"),
    ({"device": {"id": "a/b"}}, "device.id"),
    ({"broker": {"federation": "clinic\nnext"}}, "broker.federation 'clinic.nnext' must be 1-128 bytes"),
    ({"logging": {"level": "LOUD"}}, "logging.level must be one of"),
])
def test_bad_values_name_the_key(raw, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw).check(require_run=False)


def test_what_running_needs_is_required():
    with pytest.raises(ConfigError, match="broker.url is required"):
        AgentConfig().check()
    with pytest.raises(ConfigError, match="device.data is required"):
        parse_config({"broker": {"url": "mqtt://x"}, "device": {"id": "d"}}).check()


def test_flags_override_the_file():
    config = load_config(ROOT / "deploy" / "agent.toml").with_overrides(
        {"budgets.max_round_s": 12.0, "device.id": "pi-99", "broker.url": None})
    assert config.budgets.max_round_s == 12.0 and config.device.id == "pi-99"
    assert config.broker.url == "mqtt://laptop.local:1883"  # None: not given on the command line


def test_credentials_come_from_a_private_password_file(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cr@t/:\n")
    secret.chmod(0o644)
    config = parse_config({"broker": {"url": "mqtt://laptop:1883", "username": "pi-07",
                                      "password_file": str(secret)}}).check(require_run=False)
    with pytest.raises(ConfigError, match="readable by other users; chmod 600"):
        config.broker_url()
    secret.chmod(0o600)
    from fedprune.transport import parse_broker_url

    address = parse_broker_url(config.broker_url())
    assert (address.username, address.password, address.host, address.port) == ("pi-07", "s3cr@t/:", "laptop", 1883)
    assert urlparse(config.broker_url()).hostname == "laptop"


def test_agent_cli_reports_config_errors_with_status_2(tmp_path):
    bad = tmp_path / "agent.toml"
    bad.write_text((ROOT / "deploy" / "agent.toml").read_text().replace("max_round_s = 300", "max_round_sec = 300"))
    proc = subprocess.run([sys.executable, "-m", "fedprune.edge_agent.cli", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "budgets.max_round_sec" in proc.stderr
