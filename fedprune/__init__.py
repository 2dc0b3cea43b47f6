"""fedprune: federated learning with model pruning for fleets of small edge devices.

The shared core lives here: the task file, data sets and their split across devices, built-in
models, the pruning rules and schedules, and the MQTT transport. ``fedprune.converters`` owns
every byte format and imports nothing else of ours; this base imports only it;
``fedprune.aggregator`` and ``fedprune.edge_agent`` meet only through those two; and
``fedprune.simulation`` runs both side by side.
"""

__version__ = "0.1.0"
