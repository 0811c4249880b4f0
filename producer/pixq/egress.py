"""Where a webhook may be sent: public https destinations, or what the operator allows.

Checked on the *resolved* addresses, at submit and again before every delivery, so a name that
points at a private, loopback, link-local (cloud metadata: 169.254.169.254) or otherwise
non-global address is refused unless ``PIXQ_WEBHOOK_ALLOW`` lists it. Destinations on the list
may also use plain ``http``. An IPv6 address that carries an IPv4 one (NAT64, 6to4, Teredo,
IPv4-mapped, -compatible and -translated forms) is judged by the IPv4 address it reaches. Kept here
(stdlib ``ipaddress`` + ``getaddrinfo``) because no well-kept library does exactly this check
without pulling in an HTTP stack.
"""

from __future__ import annotations

import ipaddress
import socket
import unicodedata
from collections.abc import Sequence
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 address in the last 32 bits
# RFC 8215 local-use prefix: each network picks its own prefix length inside it, so where the IPv4 address
# sits is unknown; it translates to the operator's own (typically private) IPv4 space: never reachable.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 (deprecated): ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 (SIIT): ::ffff:0:a.b.c.d


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


def embedded_ipv4(address: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses that traffic to ``address`` reaches, when it is an IPv6 form carrying them.

    IPv4-mapped (``::ffff:a.b.c.d``), -translated (``::ffff:0:a.b.c.d``), -compatible (``::a.b.c.d``)
    and NAT64 (``64:ff9b::a.b.c.d``) carry it in the last 32 bits, 6to4 (``2002:AABB:CCDD::``) in bits
    16-47; Teredo (``2001:0::/32``) carries its server and, bits inverted, its client (both returned).
    Empty for every other address (``::`` and ``::1`` are themselves, not 0.0.0.0 and 0.0.0.1).
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    last32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    if address in _IPV4_TRANSLATED or address in _NAT64:
        return (last32,)
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        return (last32,)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    return ()


def control_characters(text: str) -> list[str]:
    """The control characters (C0, DEL, C1: NUL, tab, newline, ...) in ``text``, as ``U+0000`` names."""
    return sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc"})


def resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise EgressRefused(f"host {host!r} does not resolve ({exc})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _allowed(address: Address, allow: Sequence[Network]) -> bool:
    return any(address in net for net in allow if net.version == address.version)


def _on_allow_list(address: Address, allow: Sequence[Network]) -> bool:
    """Listed itself, or an IPv6 form whose embedded IPv4 addresses are all listed."""
    inner = embedded_ipv4(address)
    return _allowed(address, allow) or (bool(inner) and all(_allowed(v4, allow) for v4 in inner))


def _public(address: Address) -> bool:
    return address.is_global and not address.is_multicast


def _refusal(host: str, address: Address, allow: Sequence[Network]) -> str | None:
    """Why ``address`` may not be reached without the allow list, or ``None`` if it may."""
    how = "(the operator may allow it with PIXQ_WEBHOOK_ALLOW)"
    if address in _NAT64_LOCAL:
        return f"{host} resolves to {address}, in the local-use NAT64 prefix 64:ff9b:1::/48 {how}"
    inner = embedded_ipv4(address)
    for ipv4 in inner:
        if not _allowed(ipv4, allow) and not _public(ipv4):
            return (f"{host} resolves to {address}, which embeds {ipv4}, a private, loopback, link-local "
                    f"or reserved address {how}")
    if not inner and not _public(address):
        return f"{host} resolves to {address}, a private, loopback, link-local or reserved address {how}"
    return None


def check_destination(url: str, allow: Sequence[Network]) -> None:
    """Raise ``EgressRefused`` unless every address ``url``'s host resolves to may be reached."""
    if found := control_characters(url):
        # The resolver and the HTTP client would each read such a URL their own way (a NUL ends the
        # host for getaddrinfo; urlsplit drops tabs and newlines): refused, never interpreted.
        raise EgressRefused(f"must not contain control characters (found {', '.join(found)})")
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise EgressRefused(f"host {host!r} does not resolve")
    for address in addresses:
        if _on_allow_list(address, allow):
            continue
        if (why := _refusal(host, address, allow)) is not None:
            raise EgressRefused(why)
        if parts.scheme != "https":
            raise EgressRefused("must be an https:// URL (plain http only for PIXQ_WEBHOOK_ALLOW destinations)")
