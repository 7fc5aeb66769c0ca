"""The registry's cached rankings give the same answers as computing them afresh."""

from __future__ import annotations

import random

from supervisord_ms import selector, states
from supervisord_ms.config import parse_config
from supervisord_ms.registry import Registry


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
        expected = selector.affinity_rank(key, ranked, latencies, max_ratio=10.0)
        assert got == expected
        excluded = _names(reg.best("8B", n=8, exclude=[ranked[0]], mono=float(step)))
        assert ranked[0] not in excluded and len(excluded) == len(ranked) - 1
