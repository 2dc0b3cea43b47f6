"""Every byte format of fedprune: the update codec, the message protocol, TFLite export.

The aggregator and the edge agent meet only here: both encode and decode with these modules.
"""
