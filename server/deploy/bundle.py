"""The app bundle (FAB) a launch ships to the sites, built ahead so that sites can approve it.

`flwr run APP_DIR` builds the FAB from FED/server/app with Flower's own builder (fixed zip
timestamps, sorted files: the same files give the same bytes, so the same sha256). A site runs a
run's ClientApp only if that sha256 is in its policy's `approved_apps` (client/deploy/app_guard.py), so
the coordinator builds the bundle with `coordinator bundle FED`, sends the .fab to the sites'
admins, who inspect and approve it (`client.py approve`), and `launch` prints the hash it ships.
The federated task head is another app with another bundle (`coordinator bundle FED --head`,
shipped by `coordinator head`): a site that approved only the pretraining's refuses it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from server.deploy.flwr_app import APP_NAME, HEAD_APP_NAME, write_app, write_head_app
from server.deploy.provision import FederationPaths


def build_bundle(app_dir: Path) -> tuple[bytes, str]:
    """The FAB `flwr run app_dir` sends, and its sha256 (hex)."""
    fab = build_fab_from_disk(app_dir)
    return fab, hashlib.sha256(fab).hexdigest()


def write_bundle(paths: FederationPaths, head: bool = False) -> tuple[Path, str]:
    """Regenerate FED/server/app (head: FED/server/head-app, the federated task head's) and write
    its FAB to FED/server/<app>.<sha256[:8]>.fab."""
    fab, digest = build_bundle(write_head_app(paths) if head else write_app(paths))
    path = paths.server_dir / f"{HEAD_APP_NAME if head else APP_NAME}.{digest[:8]}.fab"
    path.write_bytes(fab)
    return path, digest


__all__ = ["build_bundle", "write_bundle"]
