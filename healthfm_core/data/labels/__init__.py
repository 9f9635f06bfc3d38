"""Prediction tasks and their labels: ACES configs, MEDS-DEV's tasks, the task as the server sends it,
and the labels a site supplies itself. Imports data/files/ and data/sequences/."""
