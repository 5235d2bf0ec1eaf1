"""Webhook URL policy (SSRF refusals, allow-list) and signatures: pure checks, no network.

Public addresses appear only as IP literals that are checked, never contacted.
"""

from __future__ import annotations

import ipaddress
import time

import pytest

from service.webhooks import (
    AllowList,
    WebhookRefused,
    address_is_public,
    check_url,
    sign,
    verify_signature,
)

pytestmark = pytest.mark.anyio

REFUSED_URLS = [
    "http://127.0.0.1/hook",
    "http://127.1.2.3:8080/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://192.0.2.10/",
    "http://[::1]/",
    "http://[::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:7f00:1::]/",
    "http://[::127.0.0.1]/",
    "http://[ff02::1]/",
    "http://localhost:9/hook",
    "http://LOCALHOST./",
    "file:///etc/passwd",
    "ftp://93.184.216.34/",
    "gopher://93.184.216.34/",
    "javascript:alert(1)",
    "http:///nohost",
    "http://user:pw@93.184.216.34/",
    "http://93.184.216.34/a b",
    "http://93.184.216.34:99999/",
    "http://93.184.216.34/" + "a" * 2100,
]


@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_refused_urls(url: str) -> None:
    with pytest.raises(WebhookRefused):
        await check_url(url, AllowList(), timeout_s=2.0)


async def test_public_and_allowed_urls() -> None:
    target = await check_url("https://93.184.216.34:8443/x?y=1", AllowList())  # never contacted
    assert (target.scheme, target.port, str(target.address)) == ("https", 8443, "93.184.216.34")
    assert (await check_url("http://[2606:4700::1]/", AllowList())).host_is_ip
    allow = AllowList.parse("127.0.0.0/8, ::1/128, localhost, .internal.test")
    assert str((await check_url("http://127.0.0.1:1/", allow)).address) == "127.0.0.1"
    assert (await check_url("http://[::1]/", allow)).port == 80
    assert (await check_url("http://localhost/", allow)).address.is_loopback
    assert allow.host_allowed("a.internal.test") and allow.host_allowed("internal.test")
    assert not allow.host_allowed("evilinternal.test")
    with pytest.raises(WebhookRefused):  # allow-listed networks do not widen to others
        await check_url("http://10.0.0.1/", allow)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("198.18.0.1", False),
        ("239.255.255.250", False),
        # IPv6 transition forms are judged by the IPv4 address inside them.
        ("64:ff9b::7f00:1", False),  # NAT64 → 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 → 169.254.169.254
        ("64:ff9b::a00:1", False),  # NAT64 → 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 → 8.8.8.8
        ("2002:7f00:1::", False),  # 6to4 → 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 → 192.168.1.1
        ("2002:808:808::1", True),  # 6to4 → 8.8.8.8
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::a9fe:a9fe", False),
        ("::8.8.8.8", True),
    ],
)
def test_address_policy(address: str, public: bool) -> None:
    assert address_is_public(ipaddress.ip_address(address)) is public


def test_signature_roundtrip_and_refusals() -> None:
    body = b'{"id":"x"}'
    now = time.time()
    headers = {"X-Ldmserve-Timestamp": str(int(now))}
    headers["X-Ldmserve-Signature"] = sign(b"k", headers["X-Ldmserve-Timestamp"], body)
    assert headers["X-Ldmserve-Signature"].startswith("sha256=")
    assert verify_signature(b"k", headers, body)
    assert not verify_signature(b"other", headers, body)
    assert not verify_signature(b"k", headers, body + b" ")
    assert not verify_signature(b"k", headers, body, now=now + 3600)  # replayed later
    assert not verify_signature(b"k", {}, body)
