"""Deadline estimation (RFC 6298 with Karn's rule and backoff) and uplink FEC at a sync point."""

import numpy as np
import pytest

from halo_p2p.errors import WireError
from halo_p2p.session.sync import ResponseTimer, SyncPoint
from halo_p2p.wire import fec
from halo_p2p.wire.chunks import split_ranges
from halo_p2p.wire.messages import Partial, PartialParity


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


# --- uplink FEC: a lost chunk of a group's partial rebuilt from its PartialParity ----------------

DIM = 576


def _frames(group: int, row: np.ndarray, n_data: int = 2) -> tuple[list[Partial], PartialParity]:
    where = {"session": 1, "step": 3, "layer": 2, "part": 1, "group": group}
    ranges = split_ranges(row.size, n_data)
    data = [Partial(**where, offset=a, data=row[a:b]) for a, b in ranges]
    parity = PartialParity(**where, n_data=n_data, data=fec.encode_parity([row[a:b] for a, b in ranges], 1)[0])
    return data, parity


def _point(owners: dict[int, str]) -> SyncPoint:
    return SyncPoint(3, 2, 1, n_tokens=1, dim=DIM, owners=owners, critical=frozenset(owners), dtype="float16",
                     sent_at_s=0.0)


@pytest.mark.parametrize("lost", [0, 1])
@pytest.mark.parametrize("parity_first", [False, True])
def test_one_lost_chunk_is_rebuilt_bit_exactly(lost: int, parity_first: bool) -> None:
    row = np.random.default_rng(lost).standard_normal(DIM).astype(np.float16)
    data, parity = _frames(4, row)
    sp = _point({4: "w"})
    arrivals: list[Partial | PartialParity] = [d for i, d in enumerate(data) if i != lost]
    arrivals = [parity, *arrivals] if parity_first else [*arrivals, parity]
    for msg in arrivals:
        (sp.add_parity if isinstance(msg, PartialParity) else sp.add)("w", msg, 1.0)
    assert sp.complete(4) and sp.done_at_s == {"w": 1.0}
    total = sp.close(2.0)
    assert total.reshape(-1).tobytes() == row.astype(np.float32).tobytes()
    assert sp.record.recovered == 1 and sp.record.used == 1 and sp.record.skipped_groups == []


def test_two_lost_chunks_cannot_be_rebuilt() -> None:
    row = np.ones(DIM, np.float16)
    data, parity = _frames(0, row, n_data=3)
    sp = _point({0: "w"})
    sp.add("w", data[0], 1.0)
    assert not sp.add_parity("w", parity, 1.0)
    assert not sp.complete(0)
    sp.close(2.0)
    assert sp.record.recovered == 0 and sp.record.skipped_groups == [0]


def test_bad_parity_is_refused_and_nothing_is_summed() -> None:
    row = np.ones(DIM, np.float16)
    data, parity = _frames(0, row)
    sp = _point({0: "w", 1: "v"})
    with pytest.raises(WireError, match="does not own"):
        sp.add_parity("v", parity, 1.0)                       # group 0 is w's
    short = PartialParity(session=1, step=3, layer=2, part=1, group=0, n_data=2, data=parity.data[:-1])
    with pytest.raises(WireError, match="expected uint16"):
        sp.add_parity("w", short, 1.0)
    wide = PartialParity(session=1, step=3, layer=2, part=1, group=0, n_data=2, data=parity.data.astype(np.uint32))
    with pytest.raises(WireError, match="expected uint16"):
        sp.add_parity("w", wide, 1.0)
    sp.add("w", data[0], 1.0)
    assert not sp.complete(0) and sp.parity == {}
