"""API keys: ``Authorization: Bearer <key>``, stored only as SHA-256 hashes.

Keys are configured as ``name:sha256hex[:priority]`` entries, in ``LDMSERVE_API_KEYS``
(comma-separated) and/or ``LDMSERVE_API_KEYS_FILE`` (one per line, ``#`` comments). The
*name* is the owner of the jobs the key creates; the key itself is never stored. The
optional *priority* (``high``, ``normal``, ``low``; default ``normal``) is the highest job
priority the key may ask for. With no entry at all, auth is off and every caller is the one
owner :data:`ANONYMOUS`, who may use every priority.

When auth is on, :class:`AuthMiddleware` (outermost but for CORS) answers 401 before the
request reaches body parsing or validation, for every path but ``/healthz``, the OpenAPI
document and docs pages, and ``/metrics`` when ``metrics_public``. The presented key is
hashed and compared with every configured hash by :func:`hmac.compare_digest`.

``/metrics`` shows every tenant's numbers, so unless ``metrics_public`` it is answered only
for the keys named in ``metrics_keys`` (admin keys); any other valid key gets 403.

Hash a key for the configuration::

    python -m service.auth hash <key>      # prints the sha256 hex digest ("-": key on stdin)
    python -m service.auth new <name>      # prints a fresh random key and its entry
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api_errors import error_response
from service.queue.keys import PRIORITIES

ANONYMOUS = "anonymous"
OWNER_SCOPE_KEY = "ldmserve.owner"
MAX_PRIORITY_SCOPE_KEY = "ldmserve.max_priority"
DEFAULT_MAX_PRIORITY = "normal"  # for a key whose entry names none
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEX = re.compile(r"[0-9a-f]{64}")
_DOCS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
METRICS_PATH = "/metrics"


def hash_key(key: str) -> str:
    """The configuration form of a key: its SHA-256 hex digest."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    """One configured key: its SHA-256 digest and the highest priority it may use."""

    digest: bytes
    max_priority: str = DEFAULT_MAX_PRIORITY


def parse_entries(text: str, separator: str = ",") -> dict[str, KeyEntry]:
    """``name:sha256hex[:priority]`` entries → {name: entry}; ValueError names a bad one."""
    out: dict[str, KeyEntry] = {}
    for raw in text.split(separator):
        entry = raw.split("#", 1)[0].strip() if separator == "\n" else raw.strip()
        if not entry:
            continue
        name, sep, rest = entry.partition(":")
        digest, _, priority = rest.partition(":")
        name, digest = name.strip(), digest.strip().lower()
        priority = priority.strip() or DEFAULT_MAX_PRIORITY
        if not sep or not _NAME.fullmatch(name) or not _HEX.fullmatch(digest):
            shown = name if _NAME.fullmatch(name) else "?"
            raise ValueError(
                f"API key entry for {shown!r} is not name:sha256hex[:priority] "
                "(name: letters, digits, _ . -; the hash: 64 lowercase hex digits)"
            )
        if priority not in PRIORITIES:
            raise ValueError(f"API key entry for {name!r}: priority must be one of {PRIORITIES}")
        if name == ANONYMOUS:
            raise ValueError(f"{ANONYMOUS!r} is reserved for the no-auth owner")
        if name in out:
            raise ValueError(f"API key name {name!r} appears twice")
        out[name] = KeyEntry(bytes.fromhex(digest), priority)
    return out


@dataclass(frozen=True)
class KeyRing:
    """The configured key hashes; empty means auth is off."""

    entries: Mapping[str, KeyEntry]

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: Path | None) -> KeyRing:
        entries = parse_entries(api_keys)
        if api_keys_file is not None:
            for name, entry in parse_entries(api_keys_file.read_text(), "\n").items():
                if name in entries:
                    raise ValueError(f"API key name {name!r} appears twice")
                entries[name] = entry
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def max_priority(self, name: str) -> str:
        """The highest priority ``name`` may use (every one while auth is off)."""
        entry = self.entries.get(name)
        return entry.max_priority if entry is not None else PRIORITIES[0]

    def identify(self, key: str) -> str | None:
        """The name of the key, or None. Every hash is compared (no early exit)."""
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for name, entry in self.entries.items():
            if hmac.compare_digest(presented, entry.digest):
                found = name
        return found


def metrics_readers(keys: KeyRing, metrics_keys: str) -> frozenset[str]:
    """The key names of ``LDMSERVE_METRICS_KEYS``; a name no key has stops the process at
    start (a typo would otherwise lock every admin out of /metrics)."""
    names = frozenset(n.strip() for n in metrics_keys.split(",") if n.strip())
    unknown = names - set(keys.entries)
    if unknown:
        raise ValueError(f"LDMSERVE_METRICS_KEYS names unknown keys: {sorted(unknown)}")
    return names


A1111_PREFIX = "/sdapi/"  # AUTOMATIC1111's API: its clients authenticate with HTTP Basic


def bearer_token(headers: list[tuple[bytes, bytes]], basic: bool = False) -> str | None:
    """The key of an ``Authorization: Bearer`` header (scheme case-insensitive); with
    ``basic``, also the password of ``Authorization: Basic`` (the user name is ignored), which
    is how A1111 clients send ``--api-auth`` (webuiapi's ``set_auth(user, password)``)."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token
            if basic and scheme.lower() == "basic" and token:
                try:
                    decoded = base64.b64decode(token, validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    return None
                _, colon, password = decoded.partition(":")
                return password if colon and password else None
            return None
    return None


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` exposes the API only to this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AuthMiddleware:
    """401 unless a configured key is presented; records the caller's name in the scope.

    With an empty key ring every request passes as :data:`ANONYMOUS`.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        metrics_public: bool,
        metrics_readers: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.keys = keys
        # "/" is the playground: a static page that asks for the key itself.
        self.public = {"/", "/healthz", *_DOCS} | ({"/metrics"} if metrics_public else set())
        self.metrics_readers = metrics_readers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.keys.enabled:
            scope[OWNER_SCOPE_KEY] = ANONYMOUS
            scope[MAX_PRIORITY_SCOPE_KEY] = PRIORITIES[0]
            await self.app(scope, receive, send)
            return
        a1111 = scope["path"].startswith(A1111_PREFIX)
        token = bearer_token(scope["headers"], basic=a1111)
        owner = self.keys.identify(token) if token is not None else None
        if owner is None and scope["path"] not in self.public:
            challenge = 'Basic realm="ldmserve"' if a1111 else 'Bearer realm="ldmserve"'
            if token is not None and not a1111:
                challenge += ', error="invalid_token"'
            message = "a valid API key is required (Authorization: Bearer <key>)"
            if a1111:
                message += " or HTTP Basic with the key as the password"
            response = error_response(
                401, "unauthorized", message, headers={"WWW-Authenticate": challenge}
            )
            await response(scope, receive, send)
            return
        if (
            owner is not None
            and scope["path"] == METRICS_PATH
            and METRICS_PATH not in self.public
            and owner not in self.metrics_readers
        ):
            message = (
                "/metrics shows every tenant's numbers: only the keys in LDMSERVE_METRICS_KEYS"
            )
            await error_response(403, "forbidden", message)(scope, receive, send)
            return
        scope[OWNER_SCOPE_KEY] = owner or ANONYMOUS
        scope[MAX_PRIORITY_SCOPE_KEY] = (
            self.keys.max_priority(owner) if owner is not None else DEFAULT_MAX_PRIORITY
        )
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.auth hash <key>`` | ``python -m service.auth new <name>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "hash":  # "-": read the key from stdin (not argv/ps)
        key = sys.stdin.readline().rstrip("\r\n") if args[1] == "-" else args[1]
        sys.stdout.write(hash_key(key) + "\n")
        return 0
    if len(args) == 2 and args[0] == "new" and _NAME.fullmatch(args[1]):
        key = "ldm_" + secrets.token_urlsafe(32)
        sys.stdout.write(f"key:   {key}\nentry: {args[1]}:{hash_key(key)}\n")
        return 0
    sys.stderr.write("usage: python -m service.auth hash <key> | new <name>\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
