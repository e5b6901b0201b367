"""API keys: read from a file or the environment, kept only as SHA-256 digests, compared in
constant time; a bind beyond loopback without any key refuses to start."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from ...config import ConfigError

PREFIX = "sha256:"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_keys(keys_file: str | None, env_var: str) -> list[str]:
    """The accepted keys' digests: `keys_file` lines (plain or `sha256:<hex>`; blank lines and
    `#` comments skipped) and the comma-separated `$env_var`."""
    digests: list[str] = []
    if keys_file:
        path = Path(keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ConfigError(f"serve.api_keys_file {path}: {err.strerror}") from None
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(PREFIX):
                hexd = line[len(PREFIX) :].lower()
                if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
                    raise ConfigError(f"{path}:{number}: `sha256:` needs 64 hex digits")
                digests.append(hexd)
            else:
                digests.append(digest(line))
    digests += [digest(k.strip()) for k in os.environ.get(env_var, "").split(",") if k.strip()]
    return digests


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def check_bind(host: str, keys: list[str]) -> None:
    if not keys and not is_loopback(host):
        raise ConfigError(
            f"serve.host {host!r} is reachable beyond this machine and no API key is set: "
            "set serve.api_keys_file or $TEMPER_API_KEYS (or bind 127.0.0.1)"
        )


def allowed(header: str | None, keys: list[str]) -> bool:
    """Whether an `Authorization: Bearer <key>` header carries an accepted key (no keys
    configured: everyone, which only a loopback bind permits)."""
    if not keys:
        return True
    if not header or not header.lower().startswith("bearer "):
        return False
    given = digest(header[7:].strip())
    ok = False
    for want in keys:  # every digest compared: the time does not tell which one matched
        ok |= hmac.compare_digest(given, want)
    return ok
