"""Reading a site's files one part ahead of the work on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def read_ahead(reads: Sequence[Callable[[], T]], name: str = "read-ahead") -> Iterator[T]:
    """The reads' results in order, the next one running in a worker thread meanwhile: parquet
    decoding releases the GIL, so reading part i + 1 overlaps the numpy work on part i (at most
    two parts are held)."""
    if len(reads) < 2:
        yield from (read() for read in reads)
        return
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        ahead = pool.submit(reads[0])
        for read in reads[1:]:
            current, ahead = ahead.result(), pool.submit(read)
            yield current
            del current
        yield ahead.result()


__all__ = ["read_ahead"]
