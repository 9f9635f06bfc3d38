"""The site's Flower ClientApp for the federated task head (Message API, flwr 1.41): the site's
side of healthfm_core/eval/federated_head.py, one handler per stage (the messages:
healthfm_core/protocol/head.py).

  query.head_stats  -> HeadStats (its train rows' count, positives, sums, sums of squares)
  query.head_setup  -> HeadSmoothness (the pooled standardisation applied to its rows, kept)
  train.head        -> HeadUpdate (its head after the local steps from the global head; under
                       DP its cumulative epsilon and delta from the site's durable ledger)
  evaluate.head     -> HeadTuning (its tuning log-loss sum and count)

Each handler calls healthfm_core/eval/head_site.py, the functions the one-process driver calls.
The site's rows (client/head_rows.py) are embedded with the release once per process; labels and
rows never leave. A site below its minimums, holding another release, or without labels for the
key answers any stage with a HeadRefusal (its reason, no number); so does a key whose train or
tuning rows differ from what the site released before (an evaluation of the same rows, an
earlier head) by fewer than the minimum of subjects, decided by the site's release gate
(client/release_gate.py) before any figure of the stage leaves. Anything raised reaches the
server as an error reply and the head goes on without this site.

DP (healthfm_core/privacy/head.py): a train.head round runs DP-SGD per subject when the server
asks (`dp`), at a noise no larger than the server accepts (`dp-max-noise-multiplier`); a site
whose policy makes DP mandatory refuses a run that did not ask for DP (the server trusts a DP
update only where it asked for one). Its steps are reserved in the site's
durable ledger (node config `state-dir`, the pretraining's ledger, shared by every process of
the site under a file lock) against the policy's epsilon cap before any step; the site fails
closed: DP asked without a budget or ledger, a ledger it cannot trust, or a round that would pass
the cap is answered with a HeadRefusal ("DP refused: ...", with its epsilon so far), never with
an update trained without DP.

Node config: the site's (`site-root`, its minimums, `policy`, `state-dir`), `model` (the release folder) and
optionally `embeddings`; in simulation `make_head_client_app(node_configs)` overlays each
partition's entry, as client/client_app.py does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.client_app import node_config
from client.head_rows import HeadRows, load_head_rows
from healthfm_core.eval.head_site import SiteSplits, local_steps, site_smoothness, site_stats, tuning_loss
from healthfm_core.eval.probes import Standardizer
from healthfm_core.privacy.head import PrivateHeadRound, private_local_steps, reserve_head_round, subject_index
from healthfm_core.privacy.ledger import LedgerError
from healthfm_core.privacy.training import DPRequest, PrivacyRefused
from healthfm_core.protocol.head import (
    HEAD_RECORD,
    HeadRefusal,
    HeadRoundRequest,
    HeadSmoothness,
    HeadStats,
    HeadTask,
    HeadTuneRequest,
    HeadTuning,
    HeadUpdate,
    StandardizerRequest,
)

log = logging.getLogger("healthfm.client")

# The site's rows of a request's tasks (client/head_rows.load_head_rows; tests give synthetic ones).
RowsOf = Callable[[Mapping[str, Any], Sequence[str]], HeadRows]

# Standardised train and tuning rows per (site, release, key) with their mean and scale, kept
# between stages in this process: Flower's Context.state would copy them with every message.
_STANDARDISED: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
_LOCK = threading.Lock()


def _reply(msg: Message, flat: Mapping[str, Any]) -> Message:
    return Message(RecordDict({HEAD_RECORD: ConfigRecord(dict(flat))}), reply_to=msg)


def _splits(rows: HeadRows, task: HeadTask) -> SiteSplits | str:
    """The key's splits at this site, or why it takes no part (a reason that may leave)."""
    if rows.require_secure_aggregation:
        return (
            f"site {rows.site}: the site policy requires secure aggregation (require_secure_aggregation); "
            "a head run's statistics and head would leave in the clear"
        )
    if task.setup_sha256 != rows.setup_sha256:
        return f"site {rows.site} holds release {rows.setup_sha256[:12]}..., not {task.setup_sha256[:12]}..."
    got = rows.keys.get(task.key)
    if got is None:
        return f"site {rows.site}: no labels for {task.key}"
    if (held := _held(rows, task.key)) is not None:
        return held
    if isinstance(got, SiteSplits):
        return got
    return f"site {rows.site}: {task.key}: {got if isinstance(got, str) else got.describe()}"


def _held(rows: HeadRows, key: str) -> str | None:
    """Why the key's figures may not leave now (None: they may): its train or tuning rows differ
    from what the site released before (an evaluation, an earlier head) by fewer than the
    minimum of subjects in a cell (client/release_gate.py). Decided and recorded before a
    stage's reply, whatever the stage: every stage's figures read the same rows."""
    candidates = rows.fields.get(key)
    if rows.gate is None or candidates is None or not rows.gate.release(candidates).held:
        return None
    return (
        f"site {rows.site}: {key}: its rows differ from what the site released before by fewer than the "
        "minimum of subjects (min_report_subjects): withheld"
    )


def _width_problem(request: StandardizerRequest, splits: SiteSplits) -> str | None:
    """Why the request's vectors do not fit this site's embeddings (None: they do)."""
    width = splits.x_train.shape[1]
    for name in type(request)._vectors:
        if (got := len(getattr(request, name))) != width:
            return f"field {name} of {got} values, embeddings of width {width}"
    return None


# Module-level (not inside make_head_client_app): Ray pickles the app's handlers by value, and
# with them any lock they name; a module's function travels by reference.
def standardised(rows: HeadRows, request: StandardizerRequest, splits: SiteSplits) -> tuple[np.ndarray, np.ndarray]:
    """The site's train and tuning rows under the request's standardisation, computed once per
    process and standardisation. Every stage after the stats carries the standardisation, so any
    process of the site (Ray runs a node's messages on any actor; a SuperNode may restart) answers."""
    mean, scale = np.asarray(request.mean), np.asarray(request.scale)
    with _LOCK:
        got = _STANDARDISED.get((rows.site, request.setup_sha256, request.key))
        if got is None or not (np.array_equal(got[0], mean) and np.array_equal(got[1], scale)):
            std = Standardizer(mean, scale)
            got = (mean, scale, std.transform(splits.x_train), std.transform(splits.x_tune))
            _STANDARDISED[(rows.site, request.setup_sha256, request.key)] = got
    return got[2], got[3]


def spend_of(rows: HeadRows) -> tuple[float, float] | None:
    """The site's cumulative (epsilon, delta) from its ledger; None without a budget, a ledger,
    or a ledger to trust (its refusal says why)."""
    if rows.dp_policy is None or rows.ledger is None:
        return None
    try:
        return rows.ledger.epsilon(rows.dp_policy.delta), rows.dp_policy.delta
    except LedgerError:
        return None


def head_run_label(request: HeadRoundRequest) -> str:
    """The ledger's run of a head round: the head run (when the server names it), the key, the release."""
    head = f"{request.key}:{request.setup_sha256[:12]}"
    return f"head:{request.dp_run}:{head}" if request.dp_run else f"head:{head}"


def head_run_prefix(request: HeadRoundRequest) -> str:
    """What the ledger runs of this head run's rounds start with (this key's head alone when the
    server names no run): the per-run limit is over those rounds."""
    return f"head:{request.dp_run}:" if request.dp_run else head_run_label(request)


def private_round(
    rows: HeadRows, request: HeadRoundRequest, splits: SiteSplits
) -> tuple[PrivateHeadRound, np.ndarray] | None:
    """This round under DP (its steps reserved in the site's durable ledger) and each train row's
    subject as 0..S-1; None: no DP (not asked, not mandatory). PrivacyRefused: DP needed but not
    possible (no budget, no ledger, the cap, no subject ids, more noise than the server accepts,
    mandatory but not asked); nothing reserved then."""
    ids = splits.train_subjects
    if request.dp and ids is None:
        raise PrivacyRefused("the train rows carry no subject ids: the head's DP is per subject")
    subject, n_subjects = subject_index(ids) if ids is not None and len(ids) else (np.zeros(0, np.int64), 0)
    dp = DPRequest(
        asked=request.dp,
        noise_multiplier=request.dp_noise_multiplier,
        target_epsilon=request.dp_target_epsilon,
        max_grad_norm=request.dp_max_grad_norm,
        batch_size=request.dp_batch_size,
        steps=request.steps,
        planned_steps=request.dp_planned_steps or request.steps,
        round=request.round,
        run=head_run_label(request),
        run_limit=None if request.dp_run_epsilon is None else (head_run_prefix(request), request.dp_run_epsilon),
    )
    got = reserve_head_round(dp, rows.dp_policy, rows.ledger, n_subjects, request.dp_max_noise_multiplier)
    return None if got is None else (got, subject)


def make_head_client_app(
    node_configs: Sequence[Mapping[str, Any]] | None = None, rows_of: RowsOf = load_head_rows
) -> ClientApp:
    """The head's ClientApp; `node_configs[partition-id]` overlays each simulated node's config."""
    app = ClientApp()

    def site_of(msg: Message, context: Context, kind: type[HeadTask]) -> tuple[Any, HeadRows, SiteSplits | str]:
        request = kind.from_flat(msg.content.config_records[HEAD_RECORD])
        rows = rows_of(node_config(context, node_configs), request.tasks)
        return request, rows, _splits(rows, request)

    def refuse(msg: Message, rows: HeadRows, reason: str, spend: tuple[float, float] | None = None) -> Message:
        log.info("site %s: head: %s", rows.site, reason)
        epsilon, delta = spend if spend is not None else (None, None)
        return _reply(msg, HeadRefusal(refused=reason, epsilon=epsilon, delta=delta).to_flat())

    @app.query("head_stats")
    def stats(msg: Message, context: Context) -> Message:
        _, rows, splits = site_of(msg, context, HeadTask)
        if isinstance(splits, str):
            return refuse(msg, rows, splits)
        stats = site_stats(splits.x_train, splits.y_train)
        y = splits.y_train
        subjects = len(y) if (ids := splits.train_subjects) is None else subject_index(ids)[1]
        out = HeadStats.of(rows.site, stats, rows.max_events, rows.max_patches, len(splits.y_tune), max(1, subjects))
        return _reply(msg, out.to_flat())

    def prepared(
        msg: Message, context: Context, kind: type[StandardizerRequest]
    ) -> Message | tuple[Any, HeadRows, SiteSplits, np.ndarray, np.ndarray]:
        """The request, the site's rows, the key's splits and its standardised train and tuning
        rows; or the refusal to send."""
        request, rows, splits = site_of(msg, context, kind)
        if isinstance(splits, str):
            return refuse(msg, rows, splits)
        if problem := _width_problem(request, splits):
            return refuse(msg, rows, problem)
        xs, xt = standardised(rows, request, splits)
        return request, rows, splits, xs, xt

    @app.query("head_setup")
    def setup(msg: Message, context: Context) -> Message:
        if isinstance(got := prepared(msg, context, StandardizerRequest), Message):
            return got
        xs = got[3]
        return _reply(msg, HeadSmoothness(smoothness=site_smoothness(xs)).to_flat())

    @app.train("head")
    def train(msg: Message, context: Context) -> Message:
        if isinstance(got := prepared(msg, context, HeadRoundRequest), Message):
            return got
        request, rows, splits, xs, _ = got
        y = np.asarray(splits.y_train, np.float64)
        try:  # under DP the round's steps are reserved in the site's ledger before any step
            private = private_round(rows, request, splits)
        except PrivacyRefused as err:
            return refuse(msg, rows, f"DP refused: {err.reason}", spend_of(rows))
        if private is None:
            w, b = local_steps(xs, y, np.asarray(request.weight), request.bias, request.penalty, request.steps, request.lr)  # fmt: skip
            return _reply(msg, HeadUpdate(weight=w.tolist(), bias=float(b), n=len(y)).to_flat())
        round_, subject = private
        w, b, taken = private_local_steps(
            xs, y, subject, np.asarray(request.weight), request.bias, request.penalty, request.steps, request.lr,
            round_.settings,
        )  # fmt: skip
        epsilon = round_.commit(taken)
        log.info("site %s: head %s round %d under DP: epsilon %.4f at delta %g", rows.site, request.key, request.round, epsilon, round_.settings.delta)  # fmt: skip
        out = HeadUpdate(weight=w.tolist(), bias=float(b), n=len(y), epsilon=epsilon, delta=round_.settings.delta)
        return _reply(msg, out.to_flat())

    @app.evaluate("head")
    def tune(msg: Message, context: Context) -> Message:
        if isinstance(got := prepared(msg, context, HeadTuneRequest), Message):
            return got
        request, _, splits, _, xt = got
        y = np.asarray(splits.y_tune, np.float64)
        loss = tuning_loss(xt, y, np.asarray(request.weight), request.bias) if len(y) else 0.0
        return _reply(msg, HeadTuning(loss_sum=loss, n=len(y)).to_flat())

    return app


# Deployment: a SuperNode loads `client.head_app:app`; the site and its release from the node config.
app = make_head_client_app()

__all__ = ["RowsOf", "app", "make_head_client_app", "node_config"]
