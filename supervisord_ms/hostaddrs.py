"""This host's addresses: a configured server is local when its ip is one of them.

The seed hard-coded the interface ``eno1``; here ``[daemon].interface`` picks one
(empty = all interfaces). Loopback always counts, so a single-host setup that
writes ``127.0.0.1`` works without knowing the interface names.
"""

from __future__ import annotations

import socket

import psutil

from .errors import ModelServerdError

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


class InterfaceNotFound(ModelServerdError):
    """``[daemon].interface`` names an interface this host does not have."""


def host_addresses(interface: str = "") -> frozenset[str]:
    """IPv4 and IPv6 addresses of ``interface`` (or of every interface), plus loopback."""
    found: set[str] = set(LOOPBACK)
    all_interfaces = psutil.net_if_addrs()
    if interface and interface not in all_interfaces:
        raise InterfaceNotFound(
            f'[daemon].interface: got "{interface}", which this host does not have; '
            f"expected one of {', '.join(sorted(all_interfaces))} (or empty for all)"
        )
    for name, addrs in all_interfaces.items():
        if interface and name != interface:
            continue
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.split("%", 1)[0])
    return frozenset(found)
