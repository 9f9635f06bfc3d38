"""The two ways a secure-aggregation round stops: the round cannot finish, or a site refuses."""

from __future__ import annotations


class SecAggError(RuntimeError):
    """The round cannot produce a correct aggregate (too few survivors, a share that does not
    reconstruct, a sum outside its bound). Raised loudly: never a wrong average."""


class SecAggRefusal(ValueError):
    """A site refuses a step: its own update fails its checks (non-finite, wrong groups or
    sizes, a count outside the round's bound) or the server asked for something that would expose
    a site (a group with too few holders, a survivor set below the threshold)."""
