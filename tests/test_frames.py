"""The session's frames, shared by the coordinator and the worker (session/frames.py)."""

from __future__ import annotations

import numpy as np
import pytest

from halo_p2p.errors import ConfigError
from halo_p2p.net.link import Channel
from halo_p2p.session.coordinator import SessionOptions
from halo_p2p.session.criticality import StaticRule
from halo_p2p.session.frames import (
    SentVector,
    answer_chunk_count,
    answer_frames,
    input_frames,
    sends_norms,
    step_channel,
)
from halo_p2p.wire import codec
from halo_p2p.wire.messages import LayerInput, SyncMode, WireDtype
from halo_p2p.wire.quant import wire_format


@pytest.mark.parametrize("fmt", ["q8_0", "float16", "float32"])
@pytest.mark.parametrize("channel", [Channel.UNRELIABLE, Channel.RELIABLE])
def test_the_coordinator_expects_the_chunks_the_worker_sends(fmt, channel) -> None:
    f = wire_format(fmt)
    rng = np.random.default_rng(0)
    for n in (64, 576, 2 * 576, 8192, 70_000):
        for n_groups, norms in ((1, None), (6, np.ones(6, np.float32)), (40, np.ones(40, np.float32))):
            values = rng.standard_normal(n).astype(np.float32)
            sent = answer_frames(2**31, 40_000, 29, 1, n_groups=n_groups, values=values, fmt=f, channel=channel,
                                 parity=False, norms=norms)
            assert sent.n_data == len(sent.frames) == answer_chunk_count(n, f, n_groups=n_groups,
                                                                        with_norms=norms is not None, channel=channel)
            assert channel == Channel.RELIABLE or max(map(len, sent.frames)) <= 1160


def test_one_input_is_quantized_once_for_every_worker() -> None:
    """Workers with other groups (other headers) and with or without parity share the payloads."""
    f, cache = wire_format("q8_0"), {}
    x = np.random.default_rng(1).standard_normal(576).astype(np.float32)
    kw = {"start_pos": 3, "n_tokens": 1, "values": x, "fmt": f, "channel": Channel.UNRELIABLE, "cache": cache}
    a = input_frames(1, 2, 0, 1, groups=(0, 1, 2), segments=(3,), parity=False, **kw)
    b = input_frames(1, 2, 0, 1, groups=(30, 31), segments=(1, 1), parity=True, **kw)
    assert (a.n_data, len(a.frames), b.n_data, len(b.frames)) == (1, 1, 1, 2)
    assert cache[1, True].payloads[0] is cache[1, False].payloads[0]
    ma, mb = codec.decode(a.frames[0]), codec.decode(b.frames[0])
    assert isinstance(ma, LayerInput) and isinstance(mb, LayerInput) and mb.groups == (30, 31)
    assert ma.data.tobytes() == mb.data.tobytes()


def test_a_sent_vector_is_sent_again_as_asked() -> None:
    sent = SentVector(Channel.UNRELIABLE, [b"d0", b"d1", b"d2", b"p0"], 3)
    assert sent.again() == sent.frames
    assert sent.again((2, 0, 7)) == [b"d2", b"d0", b"p0"]          # out-of-range chunks ignored, parity follows


def test_both_ends_agree_on_channels_and_norms() -> None:
    assert step_channel(SyncMode.STRICT, 1) == Channel.RELIABLE == step_channel("halo", 5)
    assert step_channel(SyncMode.STRICT_UNRELIABLE, 1) == Channel.UNRELIABLE == step_channel("halo", 1)
    assert sends_norms(SyncMode.HALO, 1, 8) and sends_norms("halo", 1, 8)
    assert not sends_norms(SyncMode.HALO, 1, 9) and not sends_norms(SyncMode.STRICT_UNRELIABLE, 1, 8)


def test_session_options_take_strings_give_enums_and_refuse_bad_values() -> None:
    options = SessionOptions(mode="strict-unreliable", wire_dtype="float16")
    assert options.mode is SyncMode.STRICT_UNRELIABLE and options.wire_dtype is WireDtype.FLOAT16
    assert options.mode == "strict-unreliable" and f"{options.mode}" == "strict-unreliable"
    assert SessionOptions().mode is SyncMode.HALO and SessionOptions().wire_dtype is WireDtype.Q8_0
    for kwargs, problem in (({"mode": "fast"}, "sync mode 'fast' is unknown"),
                            ({"wire_dtype": "bf16"}, "wire dtype 'bf16' is unknown"),
                            ({"max_seq_len": 0}, "max_seq_len 0 is below one token"),
                            ({"deadline_floor_s": -1.0}, "deadline_floor_s = -1.0 is negative"),
                            ({"stall_timeout_s": 0.0}, "stall_timeout_s = 0.0 must be positive")):
        with pytest.raises(ConfigError) as info:
            SessionOptions(**kwargs)
        assert info.value.problem == problem and info.value.fix
    with pytest.raises(ConfigError, match="use one of strict, strict-unreliable, halo"):
        SessionOptions(mode="fast")
    with pytest.raises(ConfigError, match=r"critical fraction 1\.5 is outside"):
        StaticRule(np.ones((2, 4)), 3, 1.5)
