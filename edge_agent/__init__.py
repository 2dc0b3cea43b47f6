"""The edge agent: runs on each device, trains the global model on local data under the shared
pruning mask, and sends back a compact update. Speaks to the aggregator only through MQTT and the
formats in ``converters``."""
