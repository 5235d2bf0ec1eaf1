"""Webhooks: the SSRF policy for ``webhook_url``, the signed body, and its verification.

Policy (checked at submit *and* again at every delivery, since DNS answers change):

* only ``http`` and ``https``, a host, no user-info, at most 2048 characters;
* the host is resolved and **every** address must be public: loopback, private (RFC 1918,
  RFC 4193), link-local (169.254/16 — cloud metadata — and fe80::/10), multicast,
  unspecified, shared (100.64/10), documentation, benchmarking and other reserved ranges
  are refused (anything Python's ``ipaddress`` does not call global), IPv4-mapped IPv6
  judged as its IPv4;
* ``LDMSERVE_WEBHOOK_ALLOW`` exempts hosts: comma-separated CIDRs (an address inside one
  passes) and hostnames (exact, or ``.example.org`` for it and its subdomains).

The delivery connects to the very address that was checked (see
:mod:`service.webhook_dispatch`), so a second DNS answer cannot redirect it.

Signature: ``X-Ldmserve-Signature: sha256=<hex>`` with ``hex = HMAC-SHA256(secret,
f"{timestamp}.{body}")`` and ``X-Ldmserve-Timestamp: <unix seconds>``; a receiver checks
it with :func:`verify_signature` (or the recipe in README.md) and refuses old timestamps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from service.schemas import iso

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_CHARS = 2048
SIGNATURE_HEADER = "X-Ldmserve-Signature"
TIMESTAMP_HEADER = "X-Ldmserve-Timestamp"


class WebhookRefused(ValueError):
    """The URL breaks the policy (the message says why; safe to show the submitter)."""


@dataclass(frozen=True)
class AllowList:
    """Exemptions from the address policy: networks and hostnames."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        networks, hosts = [], []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                # An interface spelling (10.0.0.5/8) means its whole network.
                networks.append(ipaddress.ip_interface(item).network)
            except ValueError:
                hosts.append(item.lower().rstrip("."))
        return cls(tuple(networks), tuple(hosts))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(
            host == h or (h.startswith(".") and (host.endswith(h) or host == h[1:]))
            for h in self.hosts
        )

    def address_allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries traffic to, if it is a transition form:
    IPv4-mapped, NAT64 (64:ff9b::/96: a DNS64 network's gateway connects to the IPv4
    inside), 6to4 (2002::/16) and IPv4-compatible (::a.b.c.d). Python's ``is_global``
    judges these by their IPv6 prefix, which would let 64:ff9b::7f00:1 reach 127.0.0.1."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def address_is_public(address: IPAddress) -> bool:
    """True for globally routable unicast addresses only (an IPv6 transition address is
    judged by the IPv4 address inside it)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            address = inner
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Target:
    """A checked URL and the address to connect to."""

    url: str
    scheme: str
    host: str  # as written (lowercase), no brackets
    port: int
    address: IPAddress
    host_is_ip: bool


def parse_url(url: str) -> tuple[str, str, int, bool]:
    """(scheme, host, port, host_is_ip) of an acceptable URL, else WebhookRefused."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"at most {MAX_URL_CHARS} characters")
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise WebhookRefused("must be an ASCII URL without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookRefused("only http and https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("credentials in the URL are not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("the URL has no host")
    try:
        ipaddress.ip_address(host)
        host_is_ip = True
    except ValueError:
        host_is_ip = False
    return scheme, host, port or (443 if scheme == "https" else 80), host_is_ip


async def resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    """Every address ``host`` resolves to (TCP), in resolver order."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s
        )
    except (OSError, asyncio.TimeoutError, UnicodeError) as exc:
        raise WebhookRefused(f"host {host!r} does not resolve") from exc
    out: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    if not out:
        raise WebhookRefused(f"host {host!r} does not resolve")
    return out


async def check_url(url: str, allow: AllowList, timeout_s: float = 5.0) -> Target:
    """Apply the whole policy; returns where to connect. Raises WebhookRefused."""
    scheme, host, port, host_is_ip = parse_url(url)
    if host_is_ip:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    else:
        addresses = await resolve(host, port, timeout_s)
    if not host_is_ip and allow.host_allowed(host):
        return Target(url, scheme, host, port, addresses[0], host_is_ip)
    for address in addresses:
        if not (address_is_public(address) or allow.address_allowed(address)):
            shown = f"{host} resolves to {address}" if not host_is_ip else str(address)
            raise WebhookRefused(
                f"{shown}: loopback, private, link-local and reserved addresses are refused"
            )
    return Target(url, scheme, host, port, addresses[0], host_is_ip)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Ldmserve-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """What a receiver does: recompute the HMAC, compare in constant time, refuse stale."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def delivery_body(fields: Mapping[str, str]) -> bytes:
    """The JSON body for a delivery entry (fields written by the queue's finalize step)."""
    job_id, status = fields["job"], fields["status"]
    images = []
    if status == "succeeded":
        count = int(fields.get("images") or 0)
        images = [f"/v1/jobs/{job_id}/images/{i}" for i in range(count)]
    error: dict[str, Any] | None = None
    if status == "failed":
        error = {"code": fields.get("error_code") or "failed", "message": fields.get("error", "")}
    body = {
        "type": f"job.{status}",
        "id": job_id,
        "status": status,
        "images": images,
        "error": error,
        "finished_at": iso(float(fields["finished_at"])) if fields.get("finished_at") else None,
        "links": {"self": f"/v1/jobs/{job_id}"},
    }
    return json.dumps(body, separators=(",", ":")).encode()
