"""Simulated federations on one host or several: the simulator's command (``cli``), its fleet of
asyncio devices (``fleet``), hostile devices (``attacks``), the run report (``report``) and
progress bars (``progress``).

This package sits above both the aggregator and the edge agent: it runs a real aggregator and
many real device sessions side by side, so it is the one place allowed to import both.
"""
