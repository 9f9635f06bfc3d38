"""Checking a site before it is used: `client.py check` (the problem log, event batches, wearables,
metadata), the history it covers, its tasks' counts and leakage, the privacy floor's names.
Imports the rooms below it (files, sequences, labels) and never data/sites/."""
