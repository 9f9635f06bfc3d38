"""`join`'s privacy-budget check: the state directory's ledger must be the site key's.

A DP site's spend is in its privacy ledger (STATE/site-state/privacy_ledger.json), and a summary
of it in the budget record beside its key (`<auth_key>.privacy.json`,
healthfm_core/privacy/budget_record.py). Before the SuperNode starts, `join` checks the two
agree: a state directory that lacks the key's ledger (another `--state-dir`, a lost disk), holds
another ledger, an older copy or a damaged one stops `join` with the ledger's and the record's
paths and what the key had spent, until the admin restores the ledger or passes
`--new-privacy-budget`. That flag starts a new, empty ledger (the refused files set aside, the
record keeping the given-up spend); the site says so loudly here and in every DP reply, and the
coordinator's audit log records it. Where the ledger is accepted the flag changes nothing.

Without `--auth-key` (`--insecure` tests) there is no record: the budget is bound to the state
directory alone, as in simulations.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from client.policy import load_policy
from healthfm_core.privacy.budget_record import KeyBinding, key_sha256, record_path
from healthfm_core.privacy.ledger import PrivacyLedger, spent_summary

ConfigValue = str | int | float | bool


def key_binding(auth_key: Path, public_key: str) -> KeyBinding:
    """The budget record of the site's key: beside the key file, named by the public key."""
    return KeyBinding(key_sha256=key_sha256(public_key), record=record_path(auth_key.resolve()))


def check_privacy_budget(
    node_config: dict[str, ConfigValue],
    auth_key: Path | None,
    public_key: str | None,
    new_budget: bool,
    out: TextIO,
) -> dict[str, ConfigValue]:
    """The node config keys that bind the ClientApp's ledger to the key (`privacy-record`,
    `privacy-key`; none without a key). Under a DP policy, checks (and with `new_budget` starts
    anew) the state directory's ledger against the key's record; LedgerError (a ValueError)
    naming both files and the spend when DP training would be refused."""
    binding = key_binding(auth_key, public_key) if auth_key is not None and public_key is not None else None
    extra: dict[str, ConfigValue] = (
        {"privacy-record": str(binding.record), "privacy-key": binding.key_sha256} if binding is not None else {}
    )
    policy, state = node_config.get("policy"), node_config.get("state-dir")
    dp = load_policy(str(policy)).dp if policy else None
    if dp is None or not state:
        if new_budget:
            print("--new-privacy-budget: ignored, this site's policy sets no DP budget", file=out, flush=True)
        return extra
    if new_budget:
        started = PrivacyLedger(str(state), binding, verify=False).start_new_budget()
        if started is None:
            print(
                f"--new-privacy-budget: not needed, the privacy ledger in {state} is this site's; kept as it is",
                file=out,
                flush=True,
            )
        else:
            spent = f"epsilon {started.replaced_epsilon:.4g}" if started.replaced_epsilon is not None else "unknown"
            print(
                f"WARNING: NEW PRIVACY BUDGET: started a new, empty privacy ledger in {state} "
                f"(--new-privacy-budget), replacing ledger {started.replaces or '(none known)'} (spent {spent}); "
                "the refused files are kept beside it as *.replaced-TIME; every DP reply reports this to the "
                "coordinator, whose audit log records it",
                file=out,
                flush=True,
            )
    ledger = PrivacyLedger(str(state), binding)
    data = ledger.sync_record()
    now = spent_summary(ledger.path, data)
    bound = f"; bound to this site's key by {binding.record}" if binding is not None else ""
    print(
        f"privacy ledger {ledger.path}: {now.steps} DP steps over {now.rounds} rounds, epsilon "
        f"{now.epsilon:.4g} of the policy's cap {dp.epsilon_cap:g}{bound}",
        file=out,
        flush=True,
    )
    return extra


__all__ = ["check_privacy_budget", "key_binding"]
