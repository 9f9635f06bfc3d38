"""Differential privacy at a site: DP-SGD (engine.py) and the durable privacy ledger (ledger.py)."""
