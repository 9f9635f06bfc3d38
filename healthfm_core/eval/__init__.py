"""Frozen-representation evaluation: embeddings, linear probes, metrics, plots and the report.

Import from the modules (`from healthfm_core.eval.metrics import auroc`): this package imports
none of them, so that reading an evaluation's record (outcomes.py, federation_auroc.py, plots.py:
the coordinator's dashboard) loads no torch (probes.py does).
"""
