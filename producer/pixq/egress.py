"""Where a webhook may be sent: public https destinations, or what the operator allows.

Checked on the *resolved* addresses, at submit and again before every delivery, so a name that
points at a private, loopback, link-local (cloud metadata: 169.254.169.254) or otherwise
non-global address is refused unless ``PIXQ_WEBHOOK_ALLOW`` lists it. Destinations on the list
may also use plain ``http``. Kept here (stdlib ``ipaddress`` + ``getaddrinfo``) because no
well-kept library does exactly this check without pulling in an HTTP stack.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefused(ValueError):
    """The destination is not allowed; the message says why."""


def parse_networks(raw: str) -> tuple[Network, ...]:
    """``127.0.0.1/32,10.0.0.0/8,::1`` -> networks; raises ``ValueError`` naming a bad entry."""
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise EgressRefused(f"host {host!r} does not resolve ({exc})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_destination(url: str, allow: Sequence[Network]) -> None:
    """Raise ``EgressRefused`` unless every address ``url``'s host resolves to may be reached."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise EgressRefused(f"host {host!r} does not resolve")
    for address in addresses:
        allowed = any(address in net for net in allow if net.version == address.version)
        if allowed:
            continue
        if not address.is_global or address.is_multicast:
            raise EgressRefused(
                f"{host} resolves to {address}, a private, loopback, link-local or reserved address "
                "(the operator may allow it with PIXQ_WEBHOOK_ALLOW)"
            )
        if parts.scheme != "https":
            raise EgressRefused("must be an https:// URL (plain http only for PIXQ_WEBHOOK_ALLOW destinations)")
