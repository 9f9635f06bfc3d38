"""Which run's release a site expects (issue 67, break 7).

A release's signature says the federation made it, not which run it is: every run of the
federation is signed with the same key, so a validly signed release of run B loaded where a site
meant run A's model, and its embeddings, probes and heads were B's. A site names the run it
expects: its policy's `expected_release` (client/policy.py, read by `client.py embed | probe |
predict` and by the task-head ClientApp), or `--expect-run` / `--expect-setup` of embed, probe and
predict. A release whose run id or setup sha256 differs from a named one is refused, naming both
runs (healthfm_core/release.py `load_release(..., expect=...)`). A site that names none loads any
signed release of its federation, and is told which run it loaded (`describe_run`).

Light on purpose (pydantic only): the policy imports it, and joining a federation loads no model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SHA256 = r"^[0-9a-f]{64}$"


class ExpectedRun(BaseModel):
    """The run a release must come from: its run id (release.json `run_id`, the Flower run id the
    coordinator's `launch` printed) and/or its federation setup's sha256 (the model card's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = Field(default=None, min_length=1, max_length=128)
    setup_sha256: str | None = Field(default=None, pattern=SHA256)  # whole: a prefix is cheap to match

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id_as_written(cls, v: Any) -> Any:
        # A Flower run id is a number, and a YAML policy reads `run_id: 1234` as one.
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _names_something(self) -> ExpectedRun:
        if self.run_id is None and self.setup_sha256 is None:
            raise ValueError("name the expected run_id, setup_sha256 or both")
        return self

    def mismatch(self, run_id: str, setup_sha256: str) -> str | None:
        """Why a release of (run_id, setup_sha256) is not the expected one (None: it is)."""
        if self.run_id is not None and run_id != self.run_id:
            return f"this site expects run {self.run_id}"
        if self.setup_sha256 is not None and setup_sha256 != self.setup_sha256:
            return f"this site expects setup {self.setup_sha256}"
        return None

    def describe(self) -> str:
        named = [f"run {self.run_id}"] if self.run_id is not None else []
        return " and ".join([*named, *([f"setup {self.setup_sha256[:12]}..."] if self.setup_sha256 else [])])


def describe_run(run_id: str, round_done: int, setup_sha256: str, weights_sha256: str) -> str:
    """A release's run, in the words a site admin checks it by."""
    return f"run {run_id} (round {round_done}, setup {setup_sha256[:12]}..., weights {weights_sha256[:12]}...)"


__all__ = ["ExpectedRun", "describe_run"]
