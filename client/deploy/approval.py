"""`client.py approve BUNDLE.fab --policy FILE`: show what an app bundle holds, then add its
sha256 to the site policy's `approved_apps`.

A Flower app bundle (FAB) is a zip: pyproject.toml (the app's name, publisher, version and its
components, `serverapp`/`clientapp` as "module:attribute"), the files it ships, and Flower's
manifest .info/CONTENT. The site runs a run's ClientApp only if the bundle's sha256 is approved
(client/deploy/app_guard.py); this is where the site admin looks before approving. The bundle is only
read here, never unpacked to disk nor imported.

What an approval stands for is the same in both `--clientapp` modes: the code a bundle ships runs
from the bundle's own files (cold: flwr-clientapp; warm: client/deploy/approved_code.py), anything it
does not ship from the site's installed packages.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tomllib
import zipfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from client.policy import PolicyError, load_policy
from healthfm_core.strict_files import read_config_file


class ApprovalError(ValueError):
    """A bundle or policy that cannot be read or written; the message names the file."""


class BundleFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str


class BundleInfo(BaseModel):
    """What an app bundle holds, as the site admin reviews it."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int
    name: str
    version: str
    publisher: str
    components: dict[str, str]  # serverapp/clientapp -> "module:attribute"
    files: list[BundleFile]

    def python_files(self) -> list[str]:
        """Code the bundle itself ships (a healthfm bundle ships none: it names the installed package)."""
        return [f.path for f in self.files if f.path.endswith((".py", ".pyc", ".so", ".pth"))]

    def describe(self) -> str:
        lines = [
            f"bundle     {self.name} {self.version} (publisher {self.publisher})",
            f"sha256     {self.sha256}",
            f"size       {self.size} bytes",
        ]
        lines += [f"{kind:<10} {target}" for kind, target in sorted(self.components.items())]
        lines.append(f"files      {len(self.files)}:")
        lines += [f"  {f.size:>10}  {f.sha256[:16]}  {f.path}" for f in self.files]
        code = self.python_files()
        if code:
            lines.append(
                f"WARNING: the bundle ships its own code ({', '.join(code)}): approving it lets that code "
                "run at this site (with --clientapp warm and cold alike)"
            )
        else:
            lines.append("code       none shipped: its components run this site's installed healthfm")
        return "\n".join(lines)


def inspect_bundle(data: bytes) -> BundleInfo:
    """Read a FAB's contents (in memory); ApprovalError if it is not a Flower app bundle."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        files = []
        for item in sorted(archive.infolist(), key=lambda i: i.filename):
            if item.is_dir():
                continue
            content = archive.read(item)
            files.append(BundleFile(path=item.filename, size=len(content), sha256=hashlib.sha256(content).hexdigest()))
        config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ApprovalError(f"not a Flower app bundle ({type(err).__name__}: {err})") from None
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    project = config.get("project", {})
    components = {str(k): str(v) for k, v in app.get("components", {}).items()}
    return BundleInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        name=str(project.get("name", "?")),
        version=str(project.get("version", "?")),
        publisher=str(app.get("publisher", "?")),
        components=components,
        files=files,
    )


def read_bundle(path: Path) -> BundleInfo:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ApprovalError(f"{path}: cannot read the bundle ({err.strerror or err})") from None
    try:
        return inspect_bundle(data)
    except ApprovalError as err:
        raise ApprovalError(f"{path}: {err}") from None


def approved_apps(policy: Path | None) -> tuple[frozenset[str], str | None]:
    """The policy's approved bundle hashes, and why there are none (no policy, unreadable policy)."""
    if policy is None:
        return frozenset(), "the site has no policy file (join --policy)"
    try:
        return frozenset(load_policy(policy).approved_apps), None
    except PolicyError as err:
        return frozenset(), " ".join(str(err).split())


def approve(bundle: BundleInfo, policy_path: Path) -> bool:
    """Add the bundle's sha256 to the policy's approved_apps (creating the file if absent);
    False if it was already there. The result is validated before it replaces the file.
    Rewriting the YAML drops its comments."""
    if policy_path.exists():
        load_policy(policy_path)  # a broken policy is reported as such, not rewritten
        data = read_config_file(policy_path) or {}
    else:
        data = {}
    approved = list(data.get("approved_apps") or [])
    if bundle.sha256 in approved:
        return False
    data["approved_apps"] = [*approved, bundle.sha256]
    tmp = policy_path.with_name(f".{policy_path.name}.tmp")
    text = (
        json.dumps(data, indent=1) if policy_path.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
    )
    tmp.write_text(text, encoding="utf-8")
    try:
        load_policy(tmp)
    except PolicyError:
        tmp.unlink()
        raise
    os.replace(tmp, policy_path)
    return True


__all__ = ["ApprovalError", "BundleFile", "BundleInfo", "approve", "approved_apps", "inspect_bundle", "read_bundle"]
