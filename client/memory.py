"""A site process gives the memory a message freed back to the system once the message is done.

A site's process lives for many messages (a simulation's Ray actor serves every round and the
evaluation; a warm ClientApp process the whole run). glibc's malloc keeps what a message freed
(training's activations and gradients, evaluation's embeddings and label tables) in its heaps,
and after the first large free it raises its mmap threshold, so later large tensors come from
those heaps too: without a trim such a process holds the largest footprint of every message it
served, and the next message's peak comes on top of it. After each training or evaluation
message the process collects garbage and, on glibc, returns free heap pages (malloc_trim). A warm
ClientApp trims once it is idle instead: between back-to-back tasks the next one takes the same
pages again, and faulting them back in cost the slowest site more training time than keeping them
cost it memory (client/deploy/warm_clientapp.py `collect_between_tasks`). Nothing the site keeps
on purpose (its data, sequences, model) is touched.

A warm ClientApp is started without oneDNN's primitive cache (`warm_process_env`). torch's CPU GELU
(every MLP of the model, forward and backward) runs through oneDNN, which compiles a kernel for each
new tensor shape and keeps the last 1,024 of them. A batch's shape follows its longest history, so
nearly every step brings new ones: 300 shapes held 20 MiB, and their small blocks, left between the
freed activations of each step, kept glibc from reusing the holes, so the heap grew with every task.
That was the warm ClientApp's creep (issue 69): `small`, 10 local steps, back to back, its peak RSS
went from 1.23 to 1.79 GB over 15 tasks (in use 177 -> 194 MB, the heap's free part 0.59 -> 0.96
GB); without the cache, 1.14-1.33 GB with no trend, 174 MB in use throughout. Each GELU call
compiles its kernel again instead (about 0.3 ms, forward and backward each: no difference seen in
a task's CPU time, 4.4-5.8 s against 4.7-6.4 s); the results are the same kernels', bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from healthfm_core.memory_release import release_memory

log = logging.getLogger("healthfm.client")


# Set in a process whose own loop releases memory once each reply has left (the warm ClientApp,
# client/deploy/warm_clientapp.py): a handler's release would come before its reply leaves, on the
# round's path (collecting a `small` training task's garbage took ~0.05 s at the slowest site).
_RELEASED_AFTER_REPLY = False


def release_after_reply() -> None:
    """This process releases memory itself after each reply leaves: `release_after_message` in a
    handler does nothing from now on."""
    global _RELEASED_AFTER_REPLY
    _RELEASED_AFTER_REPLY = True


def release_after_message() -> None:
    """What a handler calls once its reply is built: `release_memory`, unless this process
    releases after each reply itself (`release_after_reply`)."""
    if not _RELEASED_AFTER_REPLY:
        release_memory()


# oneDNN's own setting (also read as DNNL_PRIMITIVE_CACHE_CAPACITY by older releases), read when
# its cache is first used: in the environment the process starts with, before torch runs anything.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def warm_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for a warm ClientApp process: oneDNN's kernel cache off, unless the site's
    environment sets its size itself (a site with memory to spare may trade it for the compiles)."""
    return {ONEDNN_CACHE_ENV: "0", **environ}


__all__ = ["ONEDNN_CACHE_ENV", "release_after_message", "release_after_reply", "release_memory", "warm_process_env"]
