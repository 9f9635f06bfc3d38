"""Issue 67: the federated head's statistics leave through the site's release gate too. Its
query.head_stats reply holds a key's train rows' count, positives and feature sums: two of them
around a refresh that added one train subject give that subject's rows, outcome and embedding
sums away. Replayed with a real site on disk, its real labels and release gate, and the real
head ClientApp (client/head_app.py); the embeddings are a fixed function of each row, as a
release's are. The site refuses the second (HeadRefusal, no number) until at least the minimum
of subjects changed, also after a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from helpers.head_grid import HeadGrid
from helpers.site_export import put_back, take_out

from client.head_app import make_head_client_app
from client.head_rows import HeadRows, add_keys
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.protocol import EvalConfig
from healthfm_core.protocol.head import HEAD_RECORD, MSG_STATS, HeadRefusal, HeadStats, HeadTask, parse_reply
from simulations.synthetic import generate_federation

KEY = "onset_t2d_365d"
MINIMUM = 3
SHA = "ef" * 32


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(
        tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=150, progress=False, sites=["genomics"]
    )
    return Path(fed.sites[0].root)


def head_rows(root: Path, state: Path, gated: bool = True) -> HeadRows:
    """The site's head rows of KEY as load_head_rows builds them (labels, splits, fields)."""
    rt = SiteRuntime(SiteConfig(site_root=root, min_report_subjects=MINIMUM, min_report_positives=1, state_dir=state))
    labels = rt.labels(EvalConfig(round=1, tasks=[KEY], setup_sha256=SHA, n_boot=10))
    table = labels[KEY]
    assert isinstance(table, pa.Table)
    when = pc.cast(table["prediction_time"], pa.int64()).to_numpy()
    x = np.stack([table["subject_id"].to_numpy() % 97, when % 1009, (when // 7) % 13], axis=1).astype(np.float64)
    out = HeadRows(rt.name, SHA, 64, 8, gate=rt.gate("evaluation") if gated else None)
    add_keys(out, rt, labels, table.select(["subject_id", "prediction_time"]), x)
    return out


def head_stats(rows: HeadRows) -> HeadStats | HeadRefusal:
    grid = HeadGrid({100: {}}, make_head_client_app(rows_of=lambda config, tasks: rows))
    request = HeadTask(setup_sha256=SHA, tasks=[], key=KEY).to_flat()
    message = Message(RecordDict({HEAD_RECORD: ConfigRecord(request)}), dst_node_id=100, message_type=MSG_STATS)
    reply = grid.send_and_receive([message])[0]
    return parse_reply(reply.content.config_records[HEAD_RECORD], HeadStats, None)


@pytest.mark.usefixtures("serverapp_identity")
def test_head_statistics_around_one_added_train_subject_are_refused(export: Path, tmp_path: Path) -> None:
    root, state = Path(shutil.copytree(export, tmp_path / "genomics")), tmp_path / "state"
    rows = head_rows(root, tmp_path / "probe")
    train = np.unique(rows.fields[KEY].pairs.subject[rows.fields[KEY].pairs.field == 0])
    one, more = int(train[0]), [int(s) for s in train[1 : 1 + MINIMUM]]
    first_out, more_out = take_out(root, [one]), take_out(root, more)
    first = head_stats(head_rows(root, state))
    assert isinstance(first, HeadStats)
    put_back(first_out)
    # What the difference gave away before the gate: the subject's train rows and their sums.
    ungated = head_stats(head_rows(root, tmp_path / "elsewhere", gated=False))
    assert isinstance(ungated, HeadStats) and ungated.n > first.n
    again = head_stats(head_rows(root, state))  # a restarted site: the record is read from disk
    assert isinstance(again, HeadRefusal) and "differ from what the site released before" in again.refused
    assert again.epsilon is None
    put_back(more_out)  # the minimum of subjects more: fresh statistics
    fresh = head_stats(head_rows(root, state))
    assert isinstance(fresh, HeadStats) and fresh.n > ungated.n
