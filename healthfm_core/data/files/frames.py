"""Arrow table -> polars DataFrame, typed as a DataFrame.

pl.from_arrow returns DataFrame | Series (a Series for a single Arrow array); a Table always
gives a DataFrame, which this checks so callers get DataFrame methods.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa


def to_polars(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"pl.from_arrow gave a {type(frame).__name__} for an Arrow table, expected a DataFrame")
    return frame
