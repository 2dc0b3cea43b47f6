"""The aggregator: drives federated rounds over MQTT, averages the devices' updates, prunes the
global model on a schedule, evaluates, checkpoints and exports. Never imports the edge agent."""
