"""The registry: cached rankings give the same answers as computing them afresh, and
client reports can neither eject nor steer a server on their own."""

from __future__ import annotations

import random

import pytest

from supervisord_ms import selector, states
from supervisord_ms.config import parse_config
from supervisord_ms.registry import (
    AFFINITY_MAX_RATIO,
    CLIENT_SAMPLE_BAND,
    CLIENT_SPARES_PROBES_FOR,
    Registry,
)


def _registry(count: int = 4) -> Registry:
    text = "".join(
        f'[[servers]]\nname = "s{i}"\nip = "10.0.0.{i + 1}"\nport = 30000\n'
        f'model_size = "8B"\nmodel_path = "/m"\n'
        for i in range(count)
    )
    reg = Registry(parse_config(text, "<test>", host_addresses=[]))
    for i, record in enumerate(reg.servers.values()):
        record.state = states.READY
        record.estimate = selector.update_estimate(selector.LatencyEstimate(), 1.0 + i, 0.0)
    return reg


def _names(records) -> list[str]:
    return [r.name for r in records]


def test_state_change_is_seen_at_once():
    reg = _registry()
    assert _names(reg.best("8B", n=4, mono=1.0)) == ["s0", "s1", "s2", "s3"]
    reg.servers["s0"].state = states.BACKOFF
    assert _names(reg.best("8B", n=4, mono=1.0)) == ["s1", "s2", "s3"]


def test_ejection_ends_on_time_without_any_other_change():
    reg = _registry()
    record = reg.servers["s0"]
    for _ in range(3):
        reg.record_sample("s0", ok=False, latency_s=None, source="probe", mono=10.0)
    assert "s0" not in _names(reg.best("8B", n=4, mono=10.0))
    until = record.ejection.ejected_until
    assert until is not None
    assert "s0" in _names(reg.best("8B", n=4, mono=until + 0.01))


def test_exclude_and_key_match_a_fresh_computation():
    reg = _registry(8)
    rng = random.Random(7)
    for step in range(200):
        if step % 10 == 0:
            name = f"s{rng.randrange(8)}"
            reg.record_sample(
                name, ok=True, latency_s=rng.uniform(0.5, 5), source="probe", mono=float(step)
            )
        key = f"k{rng.randrange(20)}"
        got = _names(reg.best("8B", n=8, key=key, mono=float(step)))
        ranked = _names(reg.best("8B", n=8, mono=float(step)))
        latencies = {r.name: r.estimate.value_s for r in reg.servers.values()}
        expected = selector.affinity_rank(key, ranked, latencies, max_ratio=AFFINITY_MAX_RATIO)
        assert got == expected
        excluded = _names(reg.best("8B", n=8, exclude=[ranked[0]], mono=float(step)))
        assert ranked[0] not in excluded and len(excluded) == len(ranked) - 1


def _slow_fleet(count: int = 4) -> Registry:
    """Servers at 1 s and a last one 3x slower per token, each with 4 batch slots.
    Its estimate shows 2.4x: with its batch emptier, it is not 3x slower per request
    (the fleet bench's slow fleet measured 2.4-2.7x)."""
    reg = _registry(count)
    for i, record in enumerate(reg.servers.values()):
        latency = 2.4 if i == count - 1 else 1.0
        record.estimate = selector.update_estimate(selector.LatencyEstimate(), latency, 0.0)
        record.capacity = 4
    return reg


def _homes(reg: Registry, keys: int = 100) -> set[str]:
    return {_names(reg.best("8B", n=1, key=f"k{i}", mono=1.0))[0] for i in range(keys)}


def test_a_3x_slower_server_is_no_keys_home():
    assert _homes(_slow_fleet()) == {"s0", "s1", "s2"}


def test_the_slower_server_takes_keys_only_while_every_faster_one_is_overloaded():
    reg = _slow_fleet(2)
    fast = reg.servers["s0"]
    fast.running, fast.queued = 4, 2  # out of slots and over its share
    assert _homes(reg) == {"s1"}
    fast.running, fast.queued = 3, 0  # a free slot again
    assert _homes(reg) == {"s0"}


# --- client reports: bounded, whoever sends them (issue 12, item 2) ---------------------


def _probed(count: int = 3, latency_s: float = 1.0) -> Registry:
    """``count`` ready servers measured by one probe each at t=0 (interval 5 s)."""
    reg = _registry(count)
    for record in reg.servers.values():
        record.estimate = selector.LatencyEstimate()
        reg.record_sample(record.name, ok=True, latency_s=latency_s, source="probe", mono=0.0)
    return reg


def _fail(reg: Registry, name: str, reporter: object, mono: float, trusted: bool = False) -> None:
    reg.record_sample(
        name,
        ok=False,
        latency_s=None,
        source="client",
        reporter=reporter,
        trusted=trusted,
        mono=mono,
    )


def _ejected(reg: Registry, name: str, mono: float) -> bool:
    return selector.is_ejected(reg.servers[name].ejection, mono)


def test_one_reporter_alone_never_ejects():
    reg = _probed()
    for i in range(100):
        _fail(reg, "s0", 65534, mono=1.0 + i / 100)
    assert not _ejected(reg, "s0", 2.0)


@pytest.mark.parametrize(
    ("reports", "ejected"),
    [
        # (reporter, mono) of each failure report, all for s0
        ([(1000, 1.0), (1001, 1.1), (1000, 1.2)], True),  # two uids, three reports
        ([(1000, 1.0), (1001, 1.1)], False),  # two uids, two reports: under the threshold
        ([(1000, 1.0), (1000, 1.1), (1001, 30.0)], False),  # the first uid's are stale
        ([(1000, 1.0), (1001, 1.1), (1002, 1.2)], True),
    ],
)
def test_failures_of_two_reporters_eject(reports, ejected):
    reg = _probed()
    for reporter, mono in reports:
        _fail(reg, "s0", reporter, mono)
    assert _ejected(reg, "s0", reports[-1][1]) is ejected


def test_a_failing_probe_confirms_client_reports_and_a_good_one_clears_them():
    reg = _probed()
    for _ in range(2):
        _fail(reg, "s0", 65534, mono=1.0)
    reg.record_sample("s0", ok=True, latency_s=1.0, source="probe", mono=5.0)
    reg.record_sample("s0", ok=False, latency_s=None, source="probe", mono=10.0)
    assert not _ejected(reg, "s0", 10.0)  # the success in between cleared the reports
    for _ in range(2):
        _fail(reg, "s1", 65534, mono=11.0)
    reg.record_sample("s1", ok=False, latency_s=None, source="probe", mono=12.0)
    assert _ejected(reg, "s1", 12.0)


def test_untrusted_successes_never_cancel_failing_probes():
    reg = _probed()
    for mono in (5.0, 10.0, 15.0):
        reg.record_sample("s0", ok=False, latency_s=None, source="probe", mono=mono)
        reg.record_sample("s0", ok=True, latency_s=0.1, source="client", reporter=65534, mono=mono)
    assert _ejected(reg, "s0", 15.0)


def test_client_reports_never_eject_the_last_serving_server_of_a_size():
    reg = _probed(2)
    for reporter in (1000, 1001):
        for _ in range(3):
            _fail(reg, "s0", reporter, mono=1.0)
    assert _ejected(reg, "s0", 1.0)
    for reporter in (1000, 1001):
        for _ in range(3):
            _fail(reg, "s1", reporter, mono=1.0)
    assert not _ejected(reg, "s1", 1.0)


def test_trusted_reporters_eject_as_probes_do():
    reg = _probed()
    for _ in range(3):
        _fail(reg, "s0", 0, mono=1.0, trusted=True)
    assert _ejected(reg, "s0", 1.0)


@pytest.mark.parametrize(
    ("reported", "expected"),
    [(0.001, 1.0 / CLIENT_SAMPLE_BAND), (100.0, 1.0 * CLIENT_SAMPLE_BAND), (1.2, 1.2)],
)
def test_a_client_latency_counts_only_within_the_band_of_the_probes(reported, expected):
    reg = _probed(1)
    record = reg.servers["s0"]
    record.estimate = selector.LatencyEstimate()  # only the client's sample, to read it
    reg.record_sample("s0", ok=True, latency_s=reported, source="client", reporter=1, mono=1.0)
    assert record.estimate.value_s == pytest.approx(expected)
    assert record.probe_estimate.value_s == pytest.approx(1.0)


def test_a_reporter_counts_once_per_probe_interval_and_not_before_a_probe():
    reg = _registry(1)
    record = reg.servers["s0"]
    record.estimate = selector.LatencyEstimate()
    reg.record_sample("s0", ok=True, latency_s=0.5, source="client", reporter=1, mono=0.0)
    assert record.estimate.value_s is None  # nothing measured by the daemon yet
    reg.record_sample("s0", ok=True, latency_s=1.0, source="probe", mono=0.0)
    before = record.estimate
    for _ in range(999):
        reg.record_sample("s0", ok=True, latency_s=0.001, source="client", reporter=1, mono=1.0)
    assert record.estimate.samples == before.samples + 1
    reg.record_sample("s0", ok=True, latency_s=0.001, source="client", reporter=2, mono=1.0)
    assert record.estimate.samples == before.samples + 2  # another reporter, its own turn
    reg.record_sample("s0", ok=True, latency_s=0.001, source="client", reporter=1, mono=6.1)
    assert record.estimate.samples == before.samples + 3  # the next interval
    assert record.estimate.value_s >= 1.0 / CLIENT_SAMPLE_BAND


def test_client_requests_spare_probes_only_for_a_while():
    reg = _registry(1)
    record = reg.servers["s0"]
    interval = reg.probe_interval_s
    reg.record_sample("s0", ok=True, latency_s=1.0, source="probe", mono=0.0)
    reg.record_sample("s0", ok=True, latency_s=1.0, source="client", reporter=1, mono=1.0)
    assert record.last_client_request_at == 1.0
    late = CLIENT_SPARES_PROBES_FOR * interval + 1.0
    reg.record_sample("s0", ok=True, latency_s=1.0, source="client", reporter=1, mono=late)
    assert record.last_client_request_at == 1.0  # a probe is due whatever clients say
    reg.record_sample("s0", ok=False, latency_s=None, source="client", reporter=1, mono=2.0)
    assert record.last_client_request_at == 1.0  # a failure never spares a probe
