"""The names of a site's layout that the wire protocol speaks of too: its modalities, MEDS's split
names and the wearable channels (the on-disk contract itself: healthfm_core/data/files/layout.py).

The split names are MEDS's (`meds.train_split`, `meds.tuning_split`, `meds.held_out_split`),
written out here so that the protocol reads them without loading meds and pyarrow;
tests/unit/test_house.py checks that they still agree with the `meds` package.
"""

from __future__ import annotations

MODALITIES = ("ehr", "wearables", "genomics")

TRAIN_SPLIT = "train"
TUNING_SPLIT = "tuning"
HELD_OUT_SPLIT = "held_out"
SPLITS = (TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT)

WEARABLE_CHANNELS = ("enmo_mg", "hr_bpm")  # the value columns, in Batch.wear_epochs channel order

__all__ = ["HELD_OUT_SPLIT", "MODALITIES", "SPLITS", "TRAIN_SPLIT", "TUNING_SPLIT", "WEARABLE_CHANNELS"]
