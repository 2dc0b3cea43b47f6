"""Real MQTT brokers for tests: a private Mosquitto process (``fedprune.mosquitto``, which the
simulator uses too), under the names the tests import. The embedded amqtt broker lives in
``fedprune.aggregator.embedded_broker``.
"""

from __future__ import annotations

from fedprune.mosquitto import MosquittoProcess, free_port, mosquitto_available, mosquitto_executable

__all__ = ["MosquittoProcess", "free_port", "mosquitto_available", "mosquitto_executable"]
