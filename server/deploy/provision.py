"""Provision a federation's keys and certificates with the `cryptography` package.

What flwr 1.41 expects (read from its source):
  * TLS: the SuperLink serves its Fleet, Control and Runtime APIs over one HTTPS port and takes
    `--ssl-ca-certfile`, `--ssl-certfile`, `--ssl-keyfile` (PEM); a SuperNode (and the `flwr`
    CLI) verify the server against `--root-certificates` / `root-certificates` (the CA, PEM).
  * SuperNode authentication (`flower-superlink --enable-supernode-auth`): each SuperNode signs
    its requests with an EC key on a NIST curve, read with `load_ssh_private_key` (OpenSSH
    format, `--auth-supernode-private-key`); the coordinator registers the matching OpenSSH
    public key with `flwr supernode register KEY.pub CONNECTION`.

Layout of a federation directory (FED):

    FED/federation.json         manifest: SuperLink hostnames, sites, key fingerprints
    FED/server/          0700   stays with the coordinator
        ca.key           0600   the CA's private key (signs the SuperLink certificate)
        ca.pem                  the CA certificate (every party trusts it)
        superlink.key    0600   the SuperLink's TLS private key
        superlink.pem           the SuperLink's TLS certificate (SANs: 127.0.0.1, localhost, ...)
        site-keys/<site>.pub    each site's public key, kept for `register`
        release_signing.key 0600  the federation's Ed25519 release signing key (`coordinator release`
                                signs each release with it; healthfm_core/release_signing.py)
        release_signing.pem     its public key
        release-keys-retired/   public keys replaced by --new-release-key (<sha256[:16]>.pem)
    FED/sites/<site>/    0700   what the coordinator hands to that site's admin (then deletes)
        auth_key         0600   the site's SuperNode private key (OpenSSH, EC P-384)
        auth_key.pub            its public key (OpenSSH)
        ca.pem                  the CA certificate, to verify the SuperLink
        release_signing.pem     the federation's public release key, to verify a model release
                                (`client.py embed|probe|predict --release-key`)

Private keys are written only there, through a temporary file that is 0600 from the start, and
never replaced unless `force`: provisioning again adds what is missing and keeps the rest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

from healthfm_core.files import atomic_write_bytes
from healthfm_core.release_signing import (
    SignatureError,
    load_public_key,
    load_signing_key,
    make_signing_key,
)
from healthfm_core.release_signing import public_key_sha256 as public_key_sha256_of
from healthfm_core.strict_files import strict_model

log = logging.getLogger("healthfm.provision")

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_HOSTNAMES = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1  # flwr's node auth accepts NIST curves; P-384 is what its docs use
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
MANIFEST = "federation.json"
NGINX_CONF = "nginx.conf"  # FED/server/nginx.conf: the sites' proxy (server/deploy/proxy.py writes it)


class ProvisionError(Exception):
    """Provisioning refused or failed; the message names the file and what to do."""


class ProvisionConfig(BaseModel):
    """One provisioning request (from the coordinator's command line)."""

    model_config = ConfigDict(extra="forbid")

    federation_dir: Path
    sites: list[str] = Field(default_factory=list)
    hostnames: list[str] = Field(default_factory=list)  # added to 127.0.0.1 and localhost
    ca_days: int = Field(default=3650, ge=1)
    cert_days: int = Field(default=825, ge=1)
    force: bool = False
    new_release_key: bool = False  # rotate the release signing key (the old public key is kept, retired)

    @field_validator("sites")
    @classmethod
    def _site_names(cls, sites: list[str]) -> list[str]:
        for name in sites:
            if not SITE_NAME.match(name):
                raise ValueError(f"site name {name!r} must be 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric)")
        if len(set(sites)) != len(sites):
            raise ValueError(f"site names repeat: {sites}")
        return sites

    @field_validator("hostnames")
    @classmethod
    def _hostnames(cls, hostnames: list[str]) -> list[str]:
        for host in hostnames:
            if not host or any(c.isspace() for c in host) or "/" in host or ":" in host and not _is_ip(host):
                raise ValueError(f"hostname {host!r} is neither an IP address nor a DNS name")
        return hostnames


class SitePaths(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    dir: Path
    private_key: Path
    public_key: Path
    ca_cert: Path
    release_key: Path  # the federation's public release key (release_signing.pem)


class FederationPaths(BaseModel):
    """Where every file of a provisioned federation lives."""

    model_config = ConfigDict(frozen=True)

    root: Path

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def ca_key(self) -> Path:
        return self.server_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.server_dir / "ca.pem"

    @property
    def superlink_key(self) -> Path:
        return self.server_dir / "superlink.key"

    @property
    def superlink_cert(self) -> Path:
        return self.server_dir / "superlink.pem"

    @property
    def release_signing_key(self) -> Path:
        return self.server_dir / "release_signing.key"

    @property
    def release_public_key(self) -> Path:
        return self.server_dir / "release_signing.pem"

    @property
    def retired_release_keys_dir(self) -> Path:
        return self.server_dir / "release-keys-retired"

    @property
    def site_keys_dir(self) -> Path:
        return self.server_dir / "site-keys"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def registered_public_key(self, site: str) -> Path:
        return self.site_keys_dir / f"{site}.pub"

    def site(self, name: str) -> SitePaths:
        d = self.root / "sites" / name
        return SitePaths(
            name=name,
            dir=d,
            private_key=d / "auth_key",
            public_key=d / "auth_key.pub",
            ca_cert=d / "ca.pem",
            release_key=d / "release_signing.pem",
        )


class SiteEntry(BaseModel):
    name: str
    public_key_sha256: str  # of the OpenSSH public key line, to compare what a site holds


class FederationManifest(BaseModel):
    """FED/federation.json: public facts only (no key material)."""

    model_config = ConfigDict(extra="forbid")

    hostnames: list[str]
    ca_sha256: str  # fingerprint of the CA certificate (DER)
    superlink_cert_sha256: str
    sites: list[SiteEntry]
    # sha256 of the release signing key's raw public bytes (None: provisioned before releases were signed)
    release_key_sha256: str | None = None

    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


class ProvisionResult(BaseModel):
    paths: FederationPaths
    manifest: FederationManifest
    created: list[Path]
    kept: list[Path]


# ---------------------------------------------------------------------------- small helpers


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)


def _write_atomic(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write `data` to `path` with `mode` from the first byte on (no window in which a private
    key is world-readable); without `overwrite` an existing file is never replaced."""
    try:
        atomic_write_bytes(path, data, mode=mode, overwrite=overwrite)
    except FileExistsError:
        raise ProvisionError(f"{path} already exists; rerun with --force to replace it") from None


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_sha256(openssh_line: bytes) -> str:
    return hashlib.sha256(openssh_line.strip()).hexdigest()


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ProvisionError(f"{path}: not a readable PEM certificate ({err})") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ProvisionError(f"{path}: not a readable unencrypted PEM private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def san_entries(hostnames: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTNAMES, *hostnames]):  # ordered, no repeats
        if _is_ip(host):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            names.append(x509.DNSName(host))
    return names


def cert_hostnames(cert: x509.Certificate) -> list[str]:
    """The SANs of a certificate, as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


# ---------------------------------------------------------------------------- certificates and keys


def make_ca(
    days: int, common_name: str = "healthfm federation CA"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "healthfm"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hostnames: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, signed by the CA, valid for 127.0.0.1, localhost and
    `hostnames` (the names sites use to reach it)."""
    key = ec.generate_private_key(CURVE())
    sans = san_entries(hostnames)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "healthfm SuperLink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair as flwr 1.41 reads it: (OpenSSH private key,
    OpenSSH public key line `ecdsa-sha2-nistp384 ...`)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def verify_chain(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise ProvisionError unless `cert` is signed by `ca_cert` and valid now."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError) as err:
        reason = "bad signature" if isinstance(err, InvalidSignature) else str(err)
        raise ProvisionError(f"certificate {cert.subject.rfc4514_string()} is not issued by the CA: {reason}") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ProvisionError(
            f"certificate {cert.subject.rfc4514_string()} is not valid now "
            f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})"
        )


# ---------------------------------------------------------------------------- provisioning


def read_manifest(root: Path) -> FederationManifest:
    path = FederationPaths(root=root).manifest
    if not path.is_file():
        raise ProvisionError(f"{path} not found: provision the federation first (coordinator.py provision {root})")
    try:
        return strict_model(FederationManifest, path.read_text(), path)
    except ValueError as err:
        raise ProvisionError(f"{path}: not a federation manifest ({err})") from None


def provision(config: ProvisionConfig) -> ProvisionResult:
    """Create what is missing of a federation (CA, SuperLink certificate, site key pairs).

    Idempotent: existing keys and certificates are kept (and checked) unless `force`; a
    SuperLink certificate that lacks a requested hostname is refused rather than silently kept.
    """
    paths = FederationPaths(root=config.federation_dir.resolve())
    created: list[Path] = []
    kept: list[Path] = []
    previous = read_manifest(paths.root) if paths.manifest.is_file() else None
    sites = list(dict.fromkeys([*(previous.site_names() if previous else []), *config.sites]))
    hostnames = list(dict.fromkeys([*(previous.hostnames if previous else []), *config.hostnames]))
    paths.root.mkdir(parents=True, exist_ok=True)
    _make_private_dir(paths.server_dir)
    _make_private_dir(paths.root / "sites")

    # The CA.
    if config.force or not paths.ca_key.exists():
        if paths.ca_cert.exists() and not config.force:
            raise ProvisionError(
                f"{paths.ca_cert} exists without its key {paths.ca_key}; rerun with --force "
                "to make a new CA (every site then needs the new ca.pem)"
            )
        ca_key, ca_cert = make_ca(config.ca_days)
        _write_atomic(paths.ca_key, _pem_private(ca_key), PRIVATE_FILE_MODE, overwrite=config.force)
        _write_atomic(paths.ca_cert, _pem_cert(ca_cert), 0o644, overwrite=True)
        created += [paths.ca_key, paths.ca_cert]
        log.info("created CA %s", paths.ca_cert)
    else:
        ca_key, ca_cert = load_private_key(paths.ca_key), load_cert(paths.ca_cert)
        ca_public = ca_cert.public_key()
        if (
            not isinstance(ca_public, ec.EllipticCurvePublicKey)
            or ca_key.public_key().public_numbers() != ca_public.public_numbers()
        ):
            raise ProvisionError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
        kept += [paths.ca_key, paths.ca_cert]
    new_ca = paths.ca_key in created

    # The SuperLink's TLS certificate.
    if config.force or new_ca or not paths.superlink_key.exists():
        if paths.superlink_key.exists() and not config.force:
            raise ProvisionError(f"{paths.superlink_key} exists but the CA is new; rerun with --force")
        sl_key, sl_cert = make_server_cert(ca_key, ca_cert, hostnames, config.cert_days)
        _write_atomic(paths.superlink_key, _pem_private(sl_key), PRIVATE_FILE_MODE, overwrite=config.force)
        _write_atomic(paths.superlink_cert, _pem_cert(sl_cert), 0o644, overwrite=True)
        created += [paths.superlink_key, paths.superlink_cert]
    else:
        sl_cert = load_cert(paths.superlink_cert)
        verify_chain(sl_cert, ca_cert)
        missing = [h for h in [*DEFAULT_HOSTNAMES, *hostnames] if h not in cert_hostnames(sl_cert)]
        if missing:
            raise ProvisionError(
                f"{paths.superlink_cert} does not cover {missing}; rerun with --force to issue a "
                "new SuperLink certificate (sites keep their ca.pem)"
            )
        kept += [paths.superlink_key, paths.superlink_cert]

    release_public, new_release_key = _release_key(paths, config)
    if new_release_key:
        created += [paths.release_signing_key, paths.release_public_key]
    else:
        kept += [paths.release_signing_key, paths.release_public_key]

    # Each site's authentication key pair, plus the CA certificate and release key it needs.
    _make_private_dir(paths.site_keys_dir)
    entries: list[SiteEntry] = []
    for name in sites:
        site = paths.site(name)
        registered = paths.registered_public_key(name)
        _make_private_dir(site.dir)
        if config.force or not registered.exists():
            if site.private_key.exists() and not config.force:
                raise ProvisionError(
                    f"{site.private_key} exists but {registered} does not; rerun with --force "
                    f"to make a new key pair for site {name}"
                )
            private, public = make_site_key()
            _write_atomic(site.private_key, private, PRIVATE_FILE_MODE, overwrite=config.force)
            _write_atomic(site.public_key, public, 0o644, overwrite=True)
            _write_atomic(registered, public, 0o644, overwrite=True)
            created += [site.private_key, site.public_key, registered]
        else:
            public = registered.read_bytes()
            if site.public_key.exists() and site.public_key.read_bytes().strip() != public.strip():
                raise ProvisionError(f"{site.public_key} differs from the registered {registered}")
            kept.append(registered)
        if new_ca or config.force or not site.ca_cert.exists():
            _write_atomic(site.ca_cert, _pem_cert(ca_cert), 0o644, overwrite=True)
            created.append(site.ca_cert)
        if new_release_key or not site.release_key.exists() or site.release_key.read_bytes() != release_public:
            _write_atomic(site.release_key, release_public, 0o644, overwrite=True)
            created.append(site.release_key)
        entries.append(SiteEntry(name=name, public_key_sha256=public_key_sha256(public)))

    manifest = FederationManifest(
        hostnames=hostnames,
        ca_sha256=cert_sha256(ca_cert),
        superlink_cert_sha256=cert_sha256(sl_cert),
        sites=entries,
        release_key_sha256=load_public_key(paths.release_public_key).sha256,
    )
    _write_atomic(paths.manifest, (manifest.model_dump_json(indent=2) + "\n").encode(), 0o644, overwrite=True)
    return ProvisionResult(paths=paths, manifest=manifest, created=created, kept=kept)


def _release_key(paths: FederationPaths, config: ProvisionConfig) -> tuple[bytes, bool]:
    """The federation's release signing key pair, made when missing (or asked anew: the old public
    key is kept under release-keys-retired/); returns (public key PEM, whether it is new)."""
    key_file, public_file = paths.release_signing_key, paths.release_public_key
    if key_file.exists() and not (config.force or config.new_release_key):
        try:
            key = load_signing_key(key_file)
            public = load_public_key(public_file)
        except SignatureError as err:
            raise ProvisionError(f"{err}; rerun with --new-release-key to make a new release key") from None
        if public.sha256 != public_key_sha256_of(key.public_key()):
            raise ProvisionError(f"{key_file} does not belong to {public_file}; rerun with --new-release-key")
        return public_file.read_bytes(), False
    if public_file.exists():
        try:
            old = load_public_key(public_file)
            paths.retired_release_keys_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(
                paths.retired_release_keys_dir / f"{old.sha256[:16]}.pem", public_file.read_bytes(), 0o644, True
            )
        except SignatureError:
            log.warning("%s is unreadable: not kept among the retired release keys", public_file)
    private, public_pem = make_signing_key()
    _write_atomic(key_file, private, PRIVATE_FILE_MODE, overwrite=True)
    _write_atomic(public_file, public_pem, 0o644, overwrite=True)
    log.info("created release signing key %s", key_file)
    return public_pem, True


def describe(result: ProvisionResult) -> str:
    """What a coordinator reads after provisioning."""
    p = result.paths
    lines = [
        f"federation      {p.root}",
        f"SuperLink names {', '.join(cert_hostnames(load_cert(p.superlink_cert)))}",
        f"CA sha256       {result.manifest.ca_sha256}",
        f"release key     {p.release_public_key} (sha256 {result.manifest.release_key_sha256})",
        f"created         {len(result.created)} file(s), kept {len(result.kept)}",
    ]
    for site in result.manifest.sites:
        lines.append(
            f"site {site.name:<10} hand over {p.site(site.name).dir}/ (auth_key, auth_key.pub, ca.pem, release_signing.pem)"
        )
    return "\n".join(lines)
