"""Admission of pending signaling connections and the aggregated refusal log (pure, injected clock)."""

from __future__ import annotations

import logging

import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.net.admission import ADDRESS_LIMIT, PENDING_LIMIT, Admission, RefusalLog, source_key

LOG = "test.refusals"


def test_source_key_groups_ipv6_by_64_and_unmaps_ipv4() -> None:
    assert source_key(("10.0.0.7", 5555)) == "10.0.0.7"
    assert source_key(("fd00:1:2:3:aaaa::1", 5555, 0, 0)) == source_key(("fd00:1:2:3:bbbb::9", 1, 0, 0)) \
        == "fd00:1:2:3::/64"
    assert source_key(("fd00:1:2:4::1", 5555, 0, 0)) != source_key(("fd00:1:2:3::1", 5555, 0, 0))
    assert source_key(("::ffff:10.0.0.7", 5555, 0, 0)) == "10.0.0.7"
    assert source_key(("fe80::1%eth0", 5555, 0, 2)) == "fe80::/64"
    assert source_key("/run/sock") == "/run/sock"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_connection_evicts_the_oldest_old_one_of_its_own_address_first() -> None:
    clock = Clock()
    adm: Admission[str] = Admission(max_pending=6, max_per_source=2, min_age_s=0.25, clock=clock)
    assert adm.admit("s1", "stranger") == [] and adm.admit("s2", "stranger") == []
    clock.now += 0.3
    assert adm.admit("s3", "stranger") == [("s1", ADDRESS_LIMIT)]      # its own oldest, not anyone else's
    assert adm.admit("k1", "holder") == []
    assert adm.admit("s4", "stranger") == [("s2", ADDRESS_LIMIT)]
    assert adm.admit("s5", "stranger") == []                           # s3, s4 are too young: over the cap
    assert "k1" in adm and adm.pending_from("stranger") == 3 and len(adm) == 4
    adm.release("k1")                                                  # its offer arrived
    adm.release("k1")                                                  # idempotent
    assert "k1" not in adm and adm.pending_from("holder") == 0


def test_at_the_overall_cap_the_oldest_old_connection_goes() -> None:
    clock = Clock()
    adm: Admission[str] = Admission(max_pending=4, max_per_source=2, min_age_s=0.25, clock=clock)
    for i in range(4):
        assert adm.admit(f"c{i}", f"10.0.0.{i // 2}") == []
    assert adm.admit("young", "10.0.0.9") == []                        # all too young: 5 pending
    clock.now += 0.3
    assert adm.admit("new", "10.0.0.8") == [("c0", PENDING_LIMIT)]
    assert adm.admit("newer", "10.0.0.7") == [("c1", PENDING_LIMIT)]
    assert len(adm) == 5 and all(c in adm for c in ("young", "new", "newer", "c2", "c3"))
    with pytest.raises(ConfigError):
        Admission(max_pending=2, max_per_source=3)


def test_a_sweep_drops_old_connections_over_a_cap_without_a_new_arrival() -> None:
    clock = Clock()
    adm: Admission[str] = Admission(max_pending=5, max_per_source=2, min_age_s=0.25, clock=clock)
    assert adm.sweep_due_in_s() is None
    for i in range(4):
        adm.admit(f"s{i}", "stranger")
    clock.now += 0.1
    adm.admit("k", "holder")
    adm.admit("t", "third")
    assert adm.sweep_due_in_s() == pytest.approx(0.15)
    assert adm.sweep() == []                                           # nothing old enough yet
    clock.now += 0.2
    assert adm.sweep() == [("s0", ADDRESS_LIMIT), ("s1", ADDRESS_LIMIT)]
    assert len(adm) == 4 and adm.sweep_due_in_s() is None


def test_above_the_hard_cap_the_most_crowded_address_loses_its_oldest_whatever_its_age() -> None:
    clock = Clock()
    adm: Admission[str] = Admission(max_pending=2, max_per_source=1, min_age_s=10, max_pending_hard=6, clock=clock)
    assert adm.admit("holder", "10.0.0.1") == []
    for i in range(5):
        assert adm.admit(f"s{i}", "10.0.0.66") == []
    for i in range(5, 20):        # a burst: nothing is old enough, the hard cap takes the flood's own sockets
        assert adm.admit(f"s{i}", "10.0.0.66") == [(f"s{i - 5}", PENDING_LIMIT)]
    assert "holder" in adm and len(adm) == 6


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def test_refusals_are_logged_once_per_cause_and_interval_then_summed_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    clock = Clock()
    refusals = RefusalLog(logging.getLogger(LOG), interval_s=10.0, clock=clock)
    assert refusals.due_in_s() is None
    for i in range(1000):
        refusals.refused("auth", f"10.0.0.{i % 3}", f"auth #{i}")
        refusals.refused("timeout", "10.0.0.9", f"timeout #{i}", level=logging.INFO)
    assert messages(caplog) == ["auth #0", "timeout #0"]
    clock.now += 4
    assert refusals.due_in_s() == pytest.approx(6.0)
    refusals.flush()                                   # not due yet
    assert len(messages(caplog)) == 2
    clock.now += 6
    refusals.flush()
    assert messages(caplog)[2:] == [
        "refused 999 more signaling connections (auth) from 3 addresses in the last 10.0 s; last: auth #999",
        "refused 999 more signaling connections (timeout) from 1 address in the last 10.0 s; last: timeout #999"]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO, logging.WARNING, logging.INFO]
    assert refusals.due_in_s() is None
    refusals.refused("auth", "10.0.0.1", "auth again")  # a new interval: logged in full again
    refusals.flush(force=True)                         # nothing suppressed: no summary
    assert messages(caplog)[4:] == ["auth again"]


def test_a_refusal_after_the_interval_sums_up_the_last_one_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    clock = Clock()
    refusals = RefusalLog(logging.getLogger(LOG), interval_s=1.0, clock=clock)
    for _ in range(3):
        refusals.refused("bad_frame", "a", "junk")
    clock.now += 1.5
    refusals.refused("bad_frame", "a", "junk later")
    assert messages(caplog) == ["junk", "refused 2 more signaling connections (bad_frame) from 1 address in the "
                                        "last 1.5 s; last: junk", "junk later"]
    with pytest.raises(ConfigError):
        RefusalLog(logging.getLogger(LOG), interval_s=0)
