"""What may leave the machine: endpoint checks (no DNS) and redaction of outgoing text.

With `allow_external: false` an endpoint must be provably on this machine without asking a
resolver: a literal loopback address, or `localhost` as the hosts file maps it (every address
loopback). The client is then pinned to that literal address, so nothing resolves the name
again later (and redirects are not followed, see `clients.ApiProvider`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from .base import DEFAULT_BASE_URL, PrivacyError, ProviderConfig

# Applied in this order (most specific first), whatever order the config lists them in.
REDACTIONS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    "ip": re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    # 10+ digits with phone punctuation, optionally +country: leaves section numbers alone.
    "phone": re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,4}(?![\w])"),
}


def redact(text: str, kinds: Sequence[str], counts: Counter[str] | None = None) -> str:
    """Replace each match of the chosen kinds by `[KIND]`, counting replacements."""
    for kind in (k for k in REDACTIONS if k in kinds):

        def sub(match: re.Match[str], kind: str = kind) -> str:
            digits = sum(ch.isdigit() for ch in match.group())
            if kind == "phone" and digits < 10:
                return match.group()  # too short for a phone number: dates, amounts, sections
            if counts is not None:
                counts[kind] += 1
            return f"[{kind.upper()}]"

        text = REDACTIONS[kind].sub(sub, text)
    return text


HOSTS_FILE = Path("/etc/hosts")


def hosts_addresses(name: str, hosts_file: Path = HOSTS_FILE) -> list[str]:
    """The addresses the hosts file gives `name` (no DNS query); [] when it lists none."""
    try:
        lines = hosts_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) > 1 and name in (n.lower() for n in fields[1:]):
            found.append(fields[0])
    return found


def loopback_address(host: str, hosts_file: Path | None = None) -> str | None:
    """The literal loopback address to connect to for `host`, or None when `host` is not
    provably this machine: a literal loopback address, or `localhost` as the hosts file maps it.

    No other name counts, `*.localhost` included: deciding would mean asking a resolver, which
    may forward the name to an external DNS server, and whatever address came back would
    receive the data. Nothing here touches the network.
    """
    host = host.lower().strip("[]")
    with contextlib.suppress(ValueError):
        return host if ipaddress.ip_address(host).is_loopback else None
    if host != "localhost":
        return None
    addresses = hosts_addresses("localhost", hosts_file or HOSTS_FILE) or ["127.0.0.1"]  # RFC 6761
    try:
        loopback = [a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_loopback]
    except ValueError:
        return None
    return addresses[0] if len(loopback) == len(addresses) else None


def is_local(url: str, hosts_file: Path | None = None) -> bool:
    """True when the URL's host is provably this machine's loopback (see `loopback_address`)."""
    return loopback_address(urlparse(url).hostname or "", hosts_file) is not None


def pin_url(url: str, address: str) -> str:
    """`url` with its host replaced by the literal `address` (IPv6 in brackets)."""
    parts = urlparse(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def check_endpoint(cfg: ProviderConfig, hosts_file: Path | None = None) -> str:
    """The endpoint to use; raises PrivacyError before anything is sent if it is not allowed.

    With `allow_external: false` the URL comes back pinned to the literal loopback address,
    so the SDK never resolves a name.
    """
    url = cfg.base_url or DEFAULT_BASE_URL[cfg.kind]
    if cfg.allow_external:
        return url
    address = loopback_address(urlparse(url).hostname or "", hosts_file)
    if address is None:
        raise PrivacyError(
            f"provider {cfg.kind} endpoint {url} is not on this machine and allow_external is "
            "false: nothing was sent (only literal loopback addresses and `localhost` from the "
            "hosts file count as local). Set allow_external: true to send data to it."
        )
    return pin_url(url, address)
