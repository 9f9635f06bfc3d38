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
"""

from __future__ import annotations

import logging

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


__all__ = ["release_after_message", "release_after_reply", "release_memory"]
