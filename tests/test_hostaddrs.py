"""This host's addresses, which decide the servers that are local."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import psutil
import pytest

from supervisord_ms import hostaddrs
from supervisord_ms.errors import ModelServerdError
from supervisord_ms.hostaddrs import LOOPBACK, InterfaceNotFound, host_addresses

AF_LINK = getattr(psutil, "AF_LINK", -1)


def addr(family: int, address: str) -> SimpleNamespace:
    return SimpleNamespace(family=family, address=address, netmask=None, broadcast=None, ptp=None)


FAKE_INTERFACES = {
    "lo": [addr(socket.AF_INET, "127.0.0.1"), addr(socket.AF_INET6, "::1")],
    "eno1": [
        addr(socket.AF_INET, "10.0.0.5"),
        addr(socket.AF_INET6, "fe80::1%eno1"),
        addr(AF_LINK, "aa:bb:cc:dd:ee:ff"),
    ],
    "ib0": [addr(socket.AF_INET, "192.168.7.2"), addr(socket.AF_INET6, "2001:db8::2")],
}


@pytest.fixture
def fake_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostaddrs.psutil, "net_if_addrs", lambda: FAKE_INTERFACES)


def test_loopback_always_present():
    found = host_addresses()
    assert {"127.0.0.1", "::1", "localhost"} <= found
    assert found >= LOOPBACK


def test_all_interfaces_by_default(fake_interfaces: None):
    assert host_addresses() == LOOPBACK | {"10.0.0.5", "fe80::1", "192.168.7.2", "2001:db8::2"}


def test_one_interface_plus_loopback(fake_interfaces: None):
    # The zone of a link-local address is dropped; link-layer addresses are not IPs.
    assert host_addresses("eno1") == LOOPBACK | {"10.0.0.5", "fe80::1"}
    assert host_addresses("ib0") == LOOPBACK | {"192.168.7.2", "2001:db8::2"}


def test_unknown_interface_names_the_known_ones(fake_interfaces: None):
    with pytest.raises(InterfaceNotFound) as info:
        host_addresses("eth9")
    message = str(info.value)
    assert message.startswith('[daemon].interface: got "eth9"')
    assert "expected one of eno1, ib0, lo" in message
    assert isinstance(info.value, ModelServerdError)


def test_unknown_real_interface():
    known = sorted(psutil.net_if_addrs())
    with pytest.raises(InterfaceNotFound) as info:
        host_addresses("no-such-if0")
    for name in known:
        assert name in str(info.value)


def test_real_interface_yields_its_addresses():
    interfaces = psutil.net_if_addrs()
    ips = {
        name: {
            a.address.split("%", 1)[0]
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        }
        for name, addrs in interfaces.items()
    }
    named = [name for name, found in ips.items() if found]
    if not named:
        pytest.skip("no interface with an IP address here")
    for name in named:
        found = host_addresses(name)
        assert ips[name] <= found
        assert found >= LOOPBACK
        others = set().union(*(v for k, v in ips.items() if k != name)) - ips[name] - LOOPBACK
        assert not (others & found), f"{name} also got {others & found}"
