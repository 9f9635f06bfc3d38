"""The federation's door, deployed (issue 67, break 4): a real `coordinator superlink` (SuperLink,
nginx) on 127.0.0.1 with its sites registered, and bodies sent to its public port as an outsider
would. The SuperLink's memory is read from /proc/PID/status (VmRSS) before and after.

The break: with three made-up authentication headers a 300 MB push-object reached the SuperLink,
whose memory went 466 -> 965 MB; 8 at once left it at 3.78 GB, never given back. The door here
is opened at 400 MiB (`--max-body-mib 400`), above the forged body, so that the key, not the size,
has to refuse it. That a registered site still trains through the door is test_deployment.py's
round (and test_trust.py's sites).

Slow: a SuperLink and nginx, and 300 MB bodies over TLS.
"""

from __future__ import annotations

import datetime
import select
import socket
import ssl
import threading
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message
from helpers.deploy_fixtures import SITES, command, descendants, start_registered_superlink

from healthfm_core.model.config import load_model_config
from server.config import FederationConfig
from server.deploy.body_limit import BASE_PUSH_BODY_BYTES, MIB, run_push_body_bytes
from server.deploy.provision import FederationPaths

pytestmark = pytest.mark.slow

FORGED_BYTES = 300 * 10**6  # the body
DOOR_MIB = 400
PIECE = 1 << 20


def rss_mb(pid: int) -> float:
    """The process's resident memory (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def push(address: str, ca: Path, size: int, headers: dict[str, str]) -> tuple[str, int]:
    """POST a push-object announcing `size` bytes and send them (zeros) until an answer comes;
    (the answer's status line, how many body bytes were sent before it)."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=300), server_hostname="localhost")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    conn.sendall(
        f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
        f"Content-Length: {size}\r\n{head}\r\n".encode()
    )
    piece, sent, answer = b"\0" * PIECE, 0, b""
    try:
        while sent < size and not answer:
            if select.select([conn], [], [], 0)[0]:  # something to read: TLS housekeeping, or the answer
                conn.setblocking(False)
                try:
                    answer = conn.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    pass
                conn.setblocking(True)
            if not answer:
                n = min(PIECE, size - sent)
                conn.sendall(piece[:n])
                sent += n
    except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
        pass  # the server closed the connection after answering
    try:
        while b"\r\n" not in answer and (more := conn.recv(65536)):
            answer += more
    except (ConnectionResetError, ssl.SSLError):
        pass
    conn.close()
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), sent


def concurrently(n: int, *args: object) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    threads = [threading.Thread(target=lambda: out.append(push(*args))) for _ in range(n)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def signed(private_key: Path) -> dict[str, str]:
    """The node authentication headers a SuperNode holding `private_key` sends (Flower's
    NodeAuthHttpInterceptor): its key, a timestamp and its signature."""
    key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
    timestamp = datetime.datetime.now(datetime.UTC).isoformat()
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),  # type: ignore[arg-type]
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(sign_message(key, timestamp.encode())).decode(),  # type: ignore[arg-type]
    }


MADE_UP = {"flwr-public-key": "bWFkZS11cA==", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00"}


@pytest.fixture(scope="module")
def door(federation: FederationPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`coordinator superlink --max-body-mib 400`, the sites registered: the public address and
    the SuperLink's pid (the superlink_main process under it)."""
    out = tmp_path_factory.mktemp("door") / "superlink.out"
    proc, address = start_registered_superlink(federation, "--max-body-mib", str(DOOR_MIB), out=out)
    try:
        link = [pid for pid in descendants(proc.proc.pid) if "server.deploy.superlink_main" in command(pid)]
        assert len(link) == 1, [command(p) for p in descendants(proc.proc.pid)]
        yield address, link[0]
    finally:
        proc.stop()


def settled_rss(pid: int, near: float, within: float, patience_s: float = 60.0) -> float:
    """The process's RSS once it is within `within` MB of `near` (its release runs after the answer
    is sent), or the last reading after `patience_s`."""
    deadline = time.monotonic() + patience_s
    while True:
        now = rss_mb(pid)
        if abs(now - near) <= within or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def test_forged_headers_with_a_300_mb_body_are_refused_by_nginx_and_the_superlink_holds_nothing(
    door: tuple[str, int], federation: FederationPaths
) -> None:
    address, link = door
    before = rss_mb(link)
    [(status, sent)] = concurrently(1, address, federation.ca_cert, FORGED_BYTES, MADE_UP)
    after = settled_rss(link, before, 5)
    print(
        f"one forged 300 MB push: {status} after {sent / 1e6:.0f} MB sent; SuperLink RSS {before:.0f} -> {after:.0f} MB"
    )
    assert abs(after - before) <= 5, (before, after)
    assert status == "HTTP/1.1 412 Precondition Failed" and sent < FORGED_BYTES, (status, sent)


def test_eight_concurrent_forged_pushes_are_refused_by_nginx_and_the_superlink_holds_nothing(
    door: tuple[str, int], federation: FederationPaths
) -> None:
    """8 at once: the most one address may push at a time (nginx's PUSH_CONNECTIONS)."""
    address, link = door
    before = rss_mb(link)
    answers = concurrently(8, address, federation.ca_cert, FORGED_BYTES, MADE_UP)
    after = settled_rss(link, before, 5)
    print(f"8 forged 300 MB pushes: {sorted(answers)}; SuperLink RSS {before:.0f} -> {after:.0f} MB")
    assert abs(after - before) <= 5, (before, after)
    assert [a for a, _ in answers] == ["HTTP/1.1 412 Precondition Failed"] * 8
    assert all(sent < FORGED_BYTES for _, sent in answers)  # 412 is nginx's own answer (the SuperLink's is 401)


def test_a_registered_sites_public_key_with_a_forged_signature_is_refused_before_its_body(
    door: tuple[str, int], federation: FederationPaths
) -> None:
    """A site's public key is no secret: copied into the header, it passes nginx's map. The
    SuperLink then checks the signature from the headers before it reads a large body."""
    address, link = door
    copied = {**signed(federation.site(SITES[0]).private_key), "flwr-signature": b64encode(b"\1" * 96).decode()}
    before = rss_mb(link)
    answers = concurrently(8, address, federation.ca_cert, FORGED_BYTES, copied)
    after = settled_rss(link, before, 16)
    print(f"8 pushes with {SITES[0]}'s key, forged signature: {sorted(answers)}; SuperLink RSS {before:.0f} -> {after:.0f} MB")  # fmt: skip
    assert [a for a, _ in answers] == ["HTTP/1.1 401 Unauthorized"] * 8
    assert all(sent < FORGED_BYTES for _, sent in answers)
    assert abs(after - before) <= 16, (before, after)


def test_a_registered_sites_oversized_body_is_refused_and_the_superlinks_memory_returns(
    door: tuple[str, int], federation: FederationPaths
) -> None:
    """A registered site that signs rightly (its key stolen, or its software gone wrong): a body
    over the door's limit is refused by nginx from its Content-Length; one under it that is no
    message reaches the SuperLink, is refused there, and the memory it took is given back."""
    address, link = door
    key = federation.site(SITES[0]).private_key
    before = rss_mb(link)
    [(status, sent)] = concurrently(1, address, federation.ca_cert, (DOOR_MIB + 50) * 2**20, signed(key))
    assert status == "HTTP/1.1 413 Request Entity Too Large" and sent < FORGED_BYTES, (status, sent)
    assert abs(settled_rss(link, before, 5) - before) <= 5
    [(status, sent)] = concurrently(1, address, federation.ca_cert, FORGED_BYTES, signed(key))
    peak = rss_mb(link)
    after = settled_rss(link, before, 0.1 * before)
    print(f"{SITES[0]}, signed, 300 MB of zeros: {status}; SuperLink RSS {before:.0f} -> {after:.0f} MB")
    assert status == "HTTP/1.1 400 Bad Request" and sent == FORGED_BYTES, (status, sent, peak)
    assert after <= 1.1 * before, (before, peak, after)


def test_the_door_is_sized_from_the_launched_model_not_the_largest_preset(tmp_path: Path) -> None:
    """push-object's limit was the `paper` model's secure round for every federation (1,328 MiB),
    so a forged 300 MB body passed the size check. A run without secure aggregation needs 81 MiB
    whatever its model (a chunk, a site's setup statistics); a secure run its masked vector: `tiny`
    and `small` fit in 81 MiB, `paper` needs 1,328 MiB (what `launch` raises the door to)."""
    plain, secure = {}, {}
    for name in ("tiny", "small", "paper"):
        model = load_model_config(name)
        plain[name] = run_push_body_bytes(FederationConfig(out_dir=tmp_path, model=model)) // MIB
        secure[name] = (
            run_push_body_bytes(FederationConfig(out_dir=tmp_path, model=model, secure_aggregation=True)) // MIB
        )
    assert plain == {"tiny": 81, "small": 81, "paper": 81} and BASE_PUSH_BODY_BYTES // MIB == 81
    assert secure == {"tiny": 81, "small": 81, "paper": 1328}
    assert FORGED_BYTES > BASE_PUSH_BODY_BYTES  # the body is over the door a plain run opens
