"""An evaluation's row embeddings streamed to a memory-mapped .npy file instead of memory (issue 28).

A full evaluation (EvalConfig.max_subjects 0) embeds every labelled (subject, prediction_time) of
the site: held in memory, [pairs, d] float64 grows with the site. With a directory to write to
(the site's eval directory), embed_rows lands each batch's rows in
`<dir>/.embeddings-<pid>-<token>.npy` (np.lib.format.open_memmap, sized up front: pairs x the
model's width, float32 for a float32 model, which holds its output exactly), and the probes read
their splits' rows from it as copies, so the embeddings cost the page cache, not the process. The
pid and a random token keep concurrent evaluations of one directory apart. The file is removed
when the evaluation ends, failed or not: it holds row-level embeddings of the site's subjects,
which nothing reads after the probes are fitted (the predictions are the evaluation's output).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from healthfm_core.eval.row_embeddings import RowArray


@contextmanager
def embeddings_file(directory: str | Path) -> Iterator[RowArray]:
    """A `rows_to` for embed_rows that puts the rows in a new memory-mapped file under
    `directory` (made if missing); the file is removed when the block ends."""
    path = Path(directory) / f".embeddings-{os.getpid()}-{secrets.token_hex(6)}.npy"

    def rows_to(n: int, d: int, exact: type[np.floating]) -> np.ndarray:
        path.parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=exact, shape=(n, d))

    try:
        yield rows_to
    finally:
        # A mapping still held stays readable until dropped; the name goes now.
        path.unlink(missing_ok=True)


__all__ = ["embeddings_file"]
