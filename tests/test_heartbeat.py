"""The heartbeat bookkeeping of a link (pure): RTT, jitter and loss from heartbeat round trips."""

from __future__ import annotations

import pytest

from halo_p2p.net.heartbeat import ACK_DEADLINE_S, MIN_CLEAN, PROBE_SPEEDUP, WINDOW, HeartbeatEstimator
from halo_p2p.net.link import LinkStats


def test_rtt_is_smoothed_as_rfc_6298_and_jitter_as_rfc_3550() -> None:
    st = LinkStats()
    hb = HeartbeatEstimator(st)
    for sent_s, rtt_s in ((0.0, 0.010), (0.5, 0.018), (1.0, 0.012)):
        seq = hb.next_seq()
        hb.sent(seq, sent_s)
        hb.acked(seq, sent_s, sent_s + rtt_s)
    srtt = 10.0 + (18.0 - 10.0) / 8                      # first sample, then alpha = 1/8
    srtt += (12.0 - srtt) / 8
    jitter = 8.0 + (6.0 - 8.0) / 16                       # |18 - 10|, then |12 - 18| with gain 1/16
    assert st.rtt_ms == pytest.approx(srtt) and st.jitter_ms == pytest.approx(jitter)
    assert st.measured_plr is None                       # 3 clean round trips are no evidence


def test_loss_is_unknown_until_a_loss_or_enough_clean_round_trips() -> None:
    st = LinkStats()
    hb = HeartbeatEstimator(st)
    assert hb.interval_s(0.5) == pytest.approx(0.5 / PROBE_SPEEDUP)
    for i in range(MIN_CLEAN):
        seq = hb.next_seq()
        hb.sent(seq, float(i))
        assert st.measured_plr is None
        hb.acked(seq, float(i), i + 0.01)
    assert st.measured_plr == 0.0 and hb.interval_s(0.5) == 0.5

    st2 = LinkStats()
    hb2 = HeartbeatEstimator(st2)
    hb2.sent(hb2.next_seq(), 0.0)                         # never acknowledged
    hb2.update_plr(ACK_DEADLINE_S / 2)
    assert st2.measured_plr is None
    hb2.update_plr(ACK_DEADLINE_S + 0.1)
    assert st2.measured_plr == 1.0


def test_late_foreign_and_forgotten_acks() -> None:
    st = LinkStats()
    hb = HeartbeatEstimator(st)
    seq = hb.next_seq()
    hb.sent(seq, 0.0)
    hb.acked(seq, 99.0, 0.01)                             # not the time it was sent: ignored
    hb.acked(seq + 7, 0.0, 0.01)                          # never sent: ignored
    assert st.rtt_ms is None
    hb.acked(seq, 0.0, ACK_DEADLINE_S + 0.5)              # too late: counted lost, no RTT sample
    assert st.rtt_ms is None
    hb.update_plr(ACK_DEADLINE_S + 0.5)
    assert st.measured_plr == 1.0
    for i in range(WINDOW):                               # the window forgets the oldest
        s = hb.next_seq()
        hb.sent(s, 10.0 + i)
        hb.acked(s, 10.0 + i, 10.0 + i + 0.001)
    assert st.measured_plr == 0.0
    first = hb.next_seq() - WINDOW                        # already acknowledged: a duplicate is ignored
    hb.acked(first, 10.0, 99.0)
    assert st.measured_plr == 0.0
