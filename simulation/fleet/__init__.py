"""A simulated fleet: many devices on one host, each with its own MQTT connection.

- ``profiles``: what each device is like (tier, speed, availability, links), drawn reproducibly
  from the task's ``[simulation]`` section;
- ``link``: the emulated link that delays a message by its size and the bandwidth;
- ``connection``: one asyncio MQTT connection (aiomqtt) with the payload limit and chunking;
- ``shared_tasks``: the round's task decoded once for all the devices of a process;
- ``device``: one simulated device: a ``DeviceSession`` on a connection, training on a shared
  trainer;
- ``runner``: many devices on one event loop, started and stopped together.
"""

from fedprune.simulation.fleet.profiles import DeviceBehaviour, draw_behaviours, online_by_profile, parse_id_range
from fedprune.simulation.fleet.runner import Fleet, device_id

__all__ = ["DeviceBehaviour", "Fleet", "device_id", "draw_behaviours", "online_by_profile", "parse_id_range"]
