"""fedprune: federated learning with model pruning for fleets of small edge devices.

The shared core lives here: the task file, data sets and their split across devices, built-in
models, the pruning rules and schedules, and the MQTT transport. ``converters`` owns every byte
format; ``aggregator`` and ``edge_agent`` meet only through those two.
"""

__version__ = "0.1.0"
