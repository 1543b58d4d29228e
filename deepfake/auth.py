"""API keys and per-key rate limits for the HTTP endpoint (pure: no Ray, no web framework).

Keys come from an environment variable (`DEEPFAKE_API_KEYS`, comma-separated) or a file (one per line;
`#` comments; `name:key` names a key for logs and limits). Only their SHA-256 digests are kept, and a
presented key is compared with every digest in constant time (`hmac.compare_digest`), so neither the
process memory nor the comparison's timing gives a key away. A file line `sha256:HEX` (or `name:sha256:HEX`)
holds an already-hashed key, so the file itself need not contain secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "DEEPFAKE_API_KEYS"
HASHED = "sha256:"


class AuthError(ValueError):
    """A key file or setting that cannot be used; the message names it."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse(entry: str, where: str, n: int) -> tuple[str, bytes]:
    """(name, digest) of one `key`, `name:key`, `sha256:HEX` or `name:sha256:HEX` entry."""
    name, sep, rest = entry.partition(":")
    if not sep or name == "sha256":
        name, rest = f"key{n}", entry
    if rest.startswith(HASHED):
        try:
            d = bytes.fromhex(rest[len(HASHED) :])
        except ValueError:
            raise AuthError(f"{where}: entry {n} is not sha256:<64 hex digits>") from None
        if len(d) != 32:
            raise AuthError(f"{where}: entry {n} is not sha256:<64 hex digits>")
        return name, d
    if len(rest) < 16:
        raise AuthError(f"{where}: key {name!r} is shorter than 16 characters")
    return name, digest(rest)


@dataclass
class KeyStore:
    """Digests of the accepted keys by name; empty means the server is open (no key required)."""

    digests: dict[str, bytes] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return bool(self.digests)

    def identify(self, presented: str | None) -> str | None:
        """The name of the key presented, or None; every stored digest is compared (constant time)."""
        if not presented:
            return None
        d = digest(presented)
        found = None
        for name, stored in self.digests.items():
            if hmac.compare_digest(d, stored):
                found = name
        return found


def load_keys(file: str | Path | None = None, env: Mapping[str, str] | None = None) -> KeyStore:
    """The keys from `file` and from DEEPFAKE_API_KEYS (both may be given)."""
    env = os.environ if env is None else env
    entries: list[tuple[str, str]] = []
    for i, item in enumerate((env.get(ENV_VAR) or "").split(","), 1):
        if item.strip():
            entries.append((item.strip(), f"{ENV_VAR} entry {i}"))
    if file:
        p = Path(file).expanduser()
        if not p.is_file():
            raise AuthError(f"API key file not found: {p}")
        for i, line in enumerate(p.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append((line, f"{p} line {i}"))
    store = KeyStore()
    for n, (entry, where) in enumerate(entries, 1):
        name, d = _parse(entry, where, n)
        if name in store.digests:
            raise AuthError(f"{where}: the key name {name!r} is used twice")
        store.digests[name] = d
    return store


class RateLimiter:
    """A token bucket per key: `rate` requests per second on average, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int | None = None, clock=time.monotonic):
        if rate <= 0:
            raise AuthError(f"rate limit must be > 0 requests/s, got {rate}")
        self.rate, self.burst, self.clock = float(rate), max(1, burst or math.ceil(rate)), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 when the request may go ahead (a token is spent), else the seconds until one is available."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
