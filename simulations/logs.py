"""Logging for the simulation jobs: our progress at INFO, the frameworks' chatter held back."""

from __future__ import annotations

import logging


def setup_job_logging(flower_level: int = logging.WARNING) -> None:
    """Flower logs DEBUG through Hydra's root handler otherwise; alembic (Flower's link
    state database) is never interesting here."""
    logging.getLogger("healthfm").setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(flower_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)
