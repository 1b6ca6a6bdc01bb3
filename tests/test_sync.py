"""Deadline estimation (RFC 6298 with Karn's rule and backoff)."""

from halo_p2p.session.sync import ResponseTimer


def test_deadline_follows_samples_and_backs_off() -> None:
    t = ResponseTimer(initial_s=0.01, k=4.0, floor_s=0.001, warmup=3)
    assert t.deadline_s() == 0.01
    t.backoff()
    t.backoff()
    assert t.deadline_s() == 0.04                 # doubled per expiry before any sample
    for _ in range(5):
        t.observe(0.05)
    clean = t.deadline_s()                        # srtt + 4 rttvar; a clean sample reset the backoff
    assert 0.05 < clean < 0.1
    t.backoff()
    assert t.deadline_s() == 2 * clean
