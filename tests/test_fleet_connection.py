"""The fleet's asyncio MQTT connection on a real Mosquitto: paho's housekeeping on a slower timer
than aiomqtt's still sends the keep-alive pings that hold an idle connection open."""

from __future__ import annotations

import asyncio

import aiomqtt

from fedprune.simulation.fleet.connection import AsyncConnection, _Client


def test_the_housekeeping_override_replaces_aiomqtt_s_own():
    # aiomqtt names the coroutine replaced here; were it renamed, the override would silently do nothing.
    assert "_misc_loop" in vars(aiomqtt.Client)
    assert _Client._misc_loop is not aiomqtt.Client._misc_loop


def test_an_idle_connection_outlives_its_keepalive(mosquitto_url):
    async def idle_then_echo() -> tuple[str, bytes]:
        async with AsyncConnection(mosquitto_url, "fleet-idle", subscriptions=["t/echo"], keepalive_s=3) as conn:
            await asyncio.sleep(6.0)  # Mosquitto drops a client silent for 1.5 keep-alives: 4.5 s
            await conn.publish("t/echo", b"still here")

            async def first() -> tuple[str, bytes]:
                async for topic, payload in conn.messages():
                    return topic, payload
                raise AssertionError("the connection ended")

            return await asyncio.wait_for(first(), 5.0)

    assert asyncio.run(idle_then_echo()) == ("t/echo", b"still here")
