"""The webhook destination check (pixq/egress.py) on literal addresses: no DNS, no service.

IPv6 forms that carry an IPv4 address are judged by that address (issue 23, item 9), and a URL with a
control character is refused before anything resolves it."""

from __future__ import annotations

import ipaddress
import re

import pytest
from pixq.egress import EgressRefused, check_destination, embedded_ipv4, parse_networks

# Teredo: 2001:0:<server>:<flags>:<port ^ ffff>:<client ^ ffffffff>; server 65.54.227.120 (4136:e378).
TEREDO_TO_LOOPBACK = "2001:0:4136:e378:8000:63bf:80ff:fffe"  # client 127.0.0.1
TEREDO_TO_PUBLIC = "2001:0:4136:e378:8000:63bf:f7f7:f7f7"  # client 8.8.8.8
TEREDO_VIA_PRIVATE_SERVER = "2001:0:a00:1:8000:63bf:f7f7:f7f7"  # server 10.0.0.1, client 8.8.8.8


@pytest.mark.parametrize(("host", "embeds"), [
    ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 well-known prefix
    ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # ... to the cloud metadata service
    ("2002:7f00:1::", "127.0.0.1"),  # 6to4
    ("2002:c0a8:101::1", "192.168.1.1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
    ("::ffff:10.0.0.1", "10.0.0.1"),
    ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible
    ("::ffff:0:7f00:1", "127.0.0.1"),  # IPv4-translated
    ("::ffff:0:a9fe:a9fe", "169.254.169.254"),
    (TEREDO_TO_LOOPBACK, "127.0.0.1"),  # the client's bits are inverted in the address
    (TEREDO_VIA_PRIVATE_SERVER, "10.0.0.1"),
])
def test_an_ipv6_form_embedding_a_private_ipv4_is_refused(host: str, embeds: str) -> None:
    with pytest.raises(EgressRefused, match=f"embeds {embeds}"):
        check_destination(f"https://[{host}]/hook", ())


def test_the_local_use_nat64_prefix_is_refused() -> None:
    for host in ("64:ff9b:1::7f00:1", "64:ff9b:1:7f00:1::", "64:ff9b:1:ffff:ffff::808:808"):
        with pytest.raises(EgressRefused, match="local-use NAT64"):
            check_destination(f"https://[{host}]/", ())


@pytest.mark.parametrize("host", ["[64:ff9b::808:808]", "[2002:808:808::]", "[::ffff:8.8.8.8]",
                                  f"[{TEREDO_TO_PUBLIC}]", "[2606:4700:4700::1111]", "8.8.8.8"])
def test_a_public_destination_passes_over_https_only(host: str) -> None:
    check_destination(f"https://{host}/hook", ())
    with pytest.raises(EgressRefused, match="https"):
        check_destination(f"http://{host}/hook", ())


def test_an_embedded_address_on_the_allow_list_is_allowed_like_the_address_itself() -> None:
    allow = parse_networks("127.0.0.1/32")
    for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]"):
        check_destination(f"http://{host}:8080/hook", allow)
    with pytest.raises(EgressRefused, match="embeds 127.0.0.2"):
        check_destination("https://[64:ff9b::7f00:2]/", allow)


@pytest.mark.parametrize("host", ["::1", "::", "fe80::1", "fc00::1"])
def test_plain_ipv6_special_addresses_stay_refused(host: str) -> None:
    with pytest.raises(EgressRefused, match="private, loopback"):
        check_destination(f"https://[{host}]/", ())


@pytest.mark.parametrize(("url", "named"), [
    ("https://8.8.8.8\x00.example.com/", "U+0000"),  # getaddrinfo would see the part before the NUL
    ("https://8.8.8.8/a\x00b", "U+0000"),
    ("https://8.8.8.8/a\tb", "U+0009"),  # urlsplit drops tabs and newlines: refused, not cleaned up
    ("https://8.8.8.8/\r\nX-Injected: 1", "U+000A, U+000D"),
    ("https://8.8.8.8/\x7f", "U+007F"),
    ("https://8.8.8.8/\x85", "U+0085"),
])
def test_control_characters_are_refused(url: str, named: str) -> None:
    with pytest.raises(EgressRefused, match=re.escape(f"control characters (found {named})")):
        check_destination(url, parse_networks("0.0.0.0/0"))


def test_embedded_ipv4_reads_each_form() -> None:
    def v4s(text: str) -> list[str]:
        return [str(a) for a in embedded_ipv4(ipaddress.ip_address(text))]

    assert v4s("64:ff9b::c000:221") == ["192.0.2.33"]
    assert v4s("2002:c000:221::") == ["192.0.2.33"]
    assert v4s(TEREDO_TO_PUBLIC) == ["65.54.227.120", "8.8.8.8"]
    assert v4s("::ffff:192.0.2.33") == v4s("::ffff:0:192.0.2.33") == v4s("::192.0.2.33") == ["192.0.2.33"]
    assert v4s("::1") == v4s("::") == v4s("2606:4700:4700::1111") == v4s("8.8.8.8") == []
