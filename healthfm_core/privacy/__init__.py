"""Differential privacy at a site: one entry point, `training.make_private_training`, over
DP-SGD (engine.py), the durable privacy ledger that fails closed (ledger.py), the site's DP
budget (policy.py) and the rule for which train metrics may leave (release.py); and each
subject's fingerprints of what a site releases (contributions.py), which the site's release gate
(client/release_gate.py) compares between releases."""
