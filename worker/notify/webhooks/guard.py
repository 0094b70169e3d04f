"""The guard against webhooks to private networks (SSRF).

A merchant chooses the URL; shipmon must never be the way to reach an address inside its own
network. A URL is checked when the endpoint is registered and, because a DNS answer may change
in between, every address is checked again when a connection is made (`GuardedResolver`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = [
    "MAX_URL_LENGTH",
    "GuardedResolver",
    "IPAddress",
    "Resolver",
    "UnsafeDestination",
    "check_address",
    "check_literal",
    "check_url",
    "system_resolver",
]

# Longer URLs are refused by common servers and proxies; no receiver needs one.
MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Host name to every address it resolves to. Injectable so tests never need real DNS.
Resolver = Callable[[str], Sequence[IPAddress]]


class UnsafeDestination(Exception):
    """A webhook URL that shipmon refuses to call: not http(s), or not a public address."""


class UnresolvedHost(UnsafeDestination):
    """A webhook host name that resolves to no address (yet): nothing to call, for now."""


def system_resolver(host: str) -> list[IPAddress]:
    """Every address `host` resolves to, from the system's resolver; raises OSError."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    # An IPv6 address may carry a zone (fe80::1%eth0); the zone is not part of the address.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _blocks(
    table: dict[str, str],
) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    return [(ipaddress.ip_network(cidr), name) for cidr, name in table.items()]


# Every block of the IANA IPv4 and IPv6 special-purpose address registries (as of 2024), with
# multicast and the deprecated site-local block. A merchant's receiver is a web server on a
# public unicast address, so even the blocks the registries call globally reachable (anycast
# relays, AS112 DNS servers) are refused. The IPv6 forms that carry an IPv4 address a packet
# is delivered to are not listed: `_embedded_ipv4` finds that address, and it decides.
_SPECIAL_BLOCKS = _blocks(
    {
        "0.0.0.0/8": "this network",
        "10.0.0.0/8": "private use",
        "100.64.0.0/10": "shared address space",
        "127.0.0.0/8": "loopback",
        "169.254.0.0/16": "link-local",
        "172.16.0.0/12": "private use",
        "192.0.0.0/24": "IETF protocol assignments",
        "192.0.2.0/24": "documentation",
        "192.31.196.0/24": "AS112 DNS",
        "192.52.193.0/24": "AMT relays",
        "192.88.99.0/24": "6to4 relay anycast",
        "192.168.0.0/16": "private use",
        "192.175.48.0/24": "AS112 DNS",
        "198.18.0.0/15": "benchmarking",
        "198.51.100.0/24": "documentation",
        "203.0.113.0/24": "documentation",
        "224.0.0.0/4": "multicast",
        "240.0.0.0/4": "reserved",
        "::/128": "unspecified",
        "::1/128": "loopback",
        "::/96": "IPv4-compatible (deprecated)",
        "::ffff:0:0:0/96": "IPv4-translated",
        "64:ff9b:1::/48": "local-use IPv4/IPv6 translation",
        "100::/64": "discard-only",
        "100:0:0:1::/64": "dummy prefix",
        "2001::/23": "IETF protocol assignments, Teredo included",
        "2001:db8::/32": "documentation",
        "2620:4f:8000::/48": "AS112 DNS",
        "3fff::/20": "documentation",
        "5f00::/16": "segment routing",
        "fc00::/7": "unique local",
        "fe80::/10": "link-local",
        "fec0::/10": "site-local (deprecated)",
        "ff00::/8": "multicast",
    }
)
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to `address` ends up at: mapped, NAT64 or 6to4."""
    if address in _IPV4_MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(address) >> 80) & 0xFFFFFFFF)
    return None


def check_address(address: IPAddress, *, allow_private: bool) -> None:
    """Refuse an address that is not on the public internet, unless private ones are allowed."""
    if allow_private:
        return
    shown = str(address)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            shown = f"{address} (IPv4 {embedded})"
            address = embedded
    # Python's own view as well, for what a newer registry adds before this table knows it.
    block = next((name for net, name in _SPECIAL_BLOCKS if address in net), None)
    if block is not None or not address.is_global:
        raise UnsafeDestination(
            f"{shown} is a private, loopback, link-local or reserved address "
            f"({block or 'not global'}); webhooks go only to public addresses "
            "(set SHIPMON_WEBHOOK_ALLOW_PRIVATE=true for a test setup)"
        )


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeDestination(f"the URL has {len(url)} characters; at most {MAX_URL_LENGTH}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeDestination(f"{url!r} is not an http:// or https:// URL")
    if any(not 0 < len(label) <= 63 for label in parts.hostname.rstrip(".").split(".")):
        raise UnsafeDestination(f"{parts.hostname[:80]!r} is not a valid host name")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UnsafeDestination(f"{url!r} has an invalid port") from None
    return parts.hostname


def check_url(url: str, *, allow_private: bool, resolver: Resolver = system_resolver) -> None:
    """Refuse a webhook URL whose host is, or resolves to, a non-public address."""
    host = _host(url)
    if allow_private:
        return
    literal = _literal_address(host)
    try:
        addresses = [literal] if literal is not None else list(resolver(host))
    except UnicodeError as error:
        raise UnsafeDestination(f"{host[:80]!r} is not a valid host name ({error})") from None
    except OSError as error:
        raise UnresolvedHost(f"{host} does not resolve ({error}); check the host name") from None
    if not addresses:
        raise UnresolvedHost(f"{host} resolves to no address; check the host name")
    for address in addresses:
        check_address(address, allow_private=False)


def check_literal(url: str, *, allow_private: bool) -> None:
    """Refuse a malformed webhook URL, or one whose host is a non-public address literal.

    aiohttp connects to an address literal without asking the resolver, so `GuardedResolver`
    never sees it.
    """
    literal = _literal_address(_host(url))
    if literal is not None:
        check_address(literal, allow_private=allow_private)


class GuardedResolver(AbstractResolver):
    """Resolves for aiohttp and checks every address, so the connection goes to a checked one.

    Checking a name and then letting the HTTP client resolve it again would let a DNS answer
    that changes in between (rebinding) reach an internal address.
    """

    def __init__(self, resolver: Resolver, allow_private: bool) -> None:
        self._resolver = resolver
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await asyncio.to_thread(self._resolver, host)
        if not addresses:
            raise UnsafeDestination(f"{host} resolves to no address")
        for address in addresses:
            check_address(address, allow_private=self._allow_private)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None
