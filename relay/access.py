"""Which network addresses may call: an optional allow-list of CIDRs, and which proxies to believe.

``X-Forwarded-For`` is trusted only when the TCP peer is a configured proxy; the client is then the
right-most address in the chain that is not itself a trusted proxy (anything to its left could
have been written by the client). Pure code: no aiohttp types.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """Parse CIDRs or single addresses; raise ValueError naming the bad one."""
    networks: list[Network] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    # An IPv4 client seen through a dual-stack socket arrives as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class SourcePolicy:
    def __init__(self, allowed: tuple[Network, ...], trusted_proxies: tuple[Network, ...]) -> None:
        self.allowed = allowed
        self.trusted_proxies = trusted_proxies

    @property
    def active(self) -> bool:
        return bool(self.allowed)

    def _trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted_proxies)

    def client(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> Address | None:
        """The calling client's address, or None when it cannot be determined."""
        address = _address(peer) if peer else None
        if address is None or not self._trusted(address):
            return address
        hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
        for hop in reversed(hops):
            candidate = _address(hop)
            if candidate is None:
                return None  # a malformed hop: the chain cannot be trusted past this point
            if not self._trusted(candidate):
                return candidate
            address = candidate
        return address

    def allows(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> bool:
        if not self.allowed:
            return True
        client = self.client(peer, forwarded_for)
        return client is not None and any(client in network for network in self.allowed)
