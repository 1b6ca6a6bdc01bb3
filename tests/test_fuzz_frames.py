"""Hostile frames (issue #12, item 1): the codec refuses them with DecodeError, and no frame a peer
sends, decodable or not, ends a worker's or a coordinator's session.

The frames come from :class:`tests.wire_fuzz.FrameFuzzer` (seeded): mutations of every golden
frame and crafted CBOR. ``benchmarks/fuzz_frames.py`` runs the same generator for 500k frames.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import cbor2
import numpy as np
import pytest

from halo_p2p.engine.compute import ComputeThread
from halo_p2p.errors import DecodeError, TransportError, VersionMismatch, WireError
from halo_p2p.groups import MLP, GroupLayout
from halo_p2p.model.llama2c import Llama2cModel
from halo_p2p.model.registry import resolve
from halo_p2p.model.shard import GroupShard, Trunk
from halo_p2p.net.link import Channel
from halo_p2p.net.memory import memory_link_pair
from halo_p2p.plan import PlacementPlan, PlanBody
from halo_p2p.session.coordinator import Coordinator, SessionOptions
from halo_p2p.session.frames import input_frames
from halo_p2p.session.worker import Worker
from halo_p2p.wire import codec
from halo_p2p.wire.messages import (
    MESSAGE_TYPES,
    Bye,
    ErrorReply,
    Heartbeat,
    Message,
    NeedInput,
    Partial,
    Plan,
    PlanReady,
    Resend,
    SyncMode,
    WeightsWanted,
    WireDtype,
)
from halo_p2p.wire.quant import wire_format
from tests.wire_fuzz import STRATEGIES, FrameFuzzer, golden_frames, issue_examples

SESSION = 0x12345678      # the golden frames' session: their mutations reach a worker's handlers


def _outcome(frame: bytes) -> Message | WireError:
    """The decoded message or the project error; any other exception fails the calling test."""
    try:
        return codec.decode(frame)
    except (DecodeError, VersionMismatch) as exc:
        return exc


# --- the codec --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(issue_examples()))
def test_the_issues_frames_are_refused(name: str) -> None:
    """The frames of issue #12 are refused: as filed (wire version 1) by the version check, and the
    same attacks in this version by the field checks, naming the field, before converting anything."""
    frame = issue_examples()[name]
    expected = VersionMismatch if name.startswith(("issue:", "v1 ")) else DecodeError
    with pytest.raises(expected) as info:
        codec.decode(frame)
    if expected is DecodeError:
        assert info.value.__cause__ is None     # refused by a check, not by the safety net
    text = str(info.value)
    assert "bignum" in text or "tag 40" in text or name.startswith("issue:")
    assert len(text) < 400


def test_tag_40_shapes_are_checked_against_the_data_before_numpy_sees_them() -> None:
    partial = cbor2.loads(golden_frames()["partial"])

    def data(value: Any) -> Message | WireError:
        return _outcome(cbor2.dumps([*partial[:-1], value]))

    ok = data(cbor2.CBORTag(40, [[3], cbor2.CBORTag(85, bytes(12))]))
    assert isinstance(ok, Partial) and ok.data.shape == (3,)
    for value, message in [
        (cbor2.CBORTag(40, [[1] * 65, cbor2.CBORTag(85, bytes(4))]), "shape of 65 dimensions (1 to 8 accepted)"),
        (cbor2.CBORTag(40, [[], cbor2.CBORTag(85, bytes(4))]), "shape of 0 dimensions"),
        (cbor2.CBORTag(40, [[2, 2], cbor2.CBORTag(85, bytes(12))]), "tag 40 shape [2, 2] but 3 elements"),
        (cbor2.CBORTag(40, [[0, 2**32 - 1, 2**32 - 1], cbor2.CBORTag(85, b"")]), "of more than 2**32 elements"),
        (cbor2.CBORTag(40, [[-1], cbor2.CBORTag(85, b"")]), "invalid tag 40 shape [-1]"),
        (cbor2.CBORTag(40, [[cbor2.CBORTag(2, b"\x01" * 600)], cbor2.CBORTag(85, b"")]), "shape [a bignum of 600"),
        (cbor2.CBORTag(40, [[1], [0.5]]), "got tuple for the typed array"),
        (cbor2.CBORTag(40, [[1], cbor2.CBORTag(40, [[1], cbor2.CBORTag(85, bytes(4))])]), "got CBOR tag 40"),
    ]:
        got = data(value)
        assert isinstance(got, DecodeError) and message in str(got), (message, got)


def test_integers_are_bounded_before_any_conversion() -> None:
    """Bignums that fit 64 bits decode as ints; longer ones stay opaque and every field refuses them;
    a map key must be a string; tags cbor2 would turn into objects stay tags."""
    assert codec.decode(cbor2.dumps([2, 10, cbor2.CBORTag(2, b"\x00\x00\x07")])).session == 7   # type: ignore[union-attr]
    for items, message in [
        ([2, 9, 1, cbor2.CBORTag(2, b"\x01" + bytes(8)), 0.5], "field 'weight_bytes' must be int, got a bignum of 9"),
        ([2, 13, 1, cbor2.CBORTag(3, b"\xff" * 5000)], "field 'sent_s' must be float, got a bignum of 5000 bytes"),
        ([2, 10, cbor2.CBORTag(30, [1, 0])], "field 'session' must be int, got CBOR tag 30"),
        ([2, 11, cbor2.CBORTag(35, "(a*)*b")], "field 'reason' must be str, got CBOR tag 35"),
        ([2, 10, 2**64 - 1], "field 'session' must be in [0, 4294967295], got 18446744073709551615"),
        ([2, 10, -(2**64)], "got -18446744073709551616"),
        ([2, 8, 1, "0" * 64, {(1, 2): 3}, "q8_0", "halo"], "map key must be a text string"),
    ]:
        got = _outcome(cbor2.dumps(items))
        assert isinstance(got, DecodeError) and message in str(got), (message, got)
    with pytest.raises(DecodeError, match="longer than 1048576 bytes"):
        codec.decode(cbor2.dumps([2, 11, "x" * (1 << 20)]))


def test_a_plan_body_with_a_huge_prime_width_is_refused_at_once() -> None:
    """Found by the fuzzer: an MLP width that the group size does not divide made the error message
    search its divisors (35 s for 272948104769; forever for a large prime)."""
    plan = cbor2.loads(golden_frames()["plan"])
    plan[4]["config"]["hidden_dim"] = 2**61 - 1
    got = _outcome(cbor2.dumps(plan))
    assert isinstance(got, DecodeError)
    assert "MLP group size 4 does not divide hidden_dim 2305843009213693951" in str(got)


@pytest.mark.timeout(120)
def test_fuzzed_frames_decode_to_valid_messages_or_raise_decode_error() -> None:
    """30k seeded frames: mutations of every kind's golden frame and crafted CBOR. Each decodes to a
    message that encodes again to an equal one, or raises DecodeError / VersionMismatch: nothing else."""
    outcomes: collections.Counter[str] = collections.Counter()
    strategies: collections.Counter[str] = collections.Counter()
    for strategy, frame in (f for f, _ in zip(FrameFuzzer(seed=12), range(30_000), strict=False)):
        strategies[strategy] += 1
        got = _outcome(frame)
        if isinstance(got, WireError):
            outcomes[type(got).__name__] += 1
            continue
        assert type(got) in MESSAGE_TYPES
        assert codec.decode(codec.encode(got)) == got, (strategy, frame.hex())
        outcomes[type(got).__name__] += 1
    assert set(strategies) == set(STRATEGIES)
    assert outcomes["DecodeError"] > 20_000 and outcomes["VersionMismatch"] > 100
    assert len(set(outcomes) - {"DecodeError", "VersionMismatch"}) == len(MESSAGE_TYPES)   # every kind survives


# --- a worker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories():
    return Llama2cModel.open(resolve("stories260K").path)


class _FailingShard:
    """A real shard whose answer fails for one start position (as a torch error would)."""

    FAIL_AT = 13

    def __init__(self, shard: GroupShard) -> None:
        self._shard = shard

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shard, name)

    def answer(self, layer, part, x, start_pos, rows, **kw):
        if start_pos == self.FAIL_AT:
            raise RuntimeError("simulated failure of the shard")
        return self._shard.answer(layer, part, x, start_pos, rows, **kw)


async def test_a_worker_fed_fuzzed_frames_counts_them_and_keeps_serving(stories) -> None:
    """Fuzzed frames on both channels, inputs beyond the context, an input the shard fails on and a
    plan whose model cannot be opened (not a HaloError): each is counted, none ends the session, and
    the worker still takes a plan and answers an input afterwards."""
    layout = GroupLayout.from_config(stories.config)
    plan = PlacementPlan.split(layout, ["c", "w"], coordinator="c")
    body = PlanBody(placement=plan, config=stories.config, max_seq_len=64)

    def opener(sha, body):
        if sha == "f" * 64:
            raise MemoryError("cannot allocate the KV cache")
        return layout, lambda groups, max_seq_len: _FailingShard(GroupShard(stories, layout, groups,
                                                                            max_seq_len=max_seq_len))

    def plan_frame(session: int, sha: str = "0" * 64) -> bytes:
        return codec.encode(Plan(session=session, model_sha256=sha, plan=body, wire_dtype=WireDtype.FLOAT32,
                                 mode=SyncMode.HALO))

    held = tuple(g.index for g in plan.groups_of("w") if (g.layer, g.part) == (0, MLP))
    x = np.random.default_rng(0).standard_normal(layout.dim).astype(np.float32)

    def inputs(session: int, step: int, start_pos: int) -> list[bytes]:
        return input_frames(session, step, 0, MLP, start_pos=start_pos, n_tokens=1, groups=held,
                            segments=(len(held),), values=x, fmt=wire_format("float32"), channel=Channel.UNRELIABLE,
                            parity=False, cache={}).frames

    a, b = memory_link_pair("c", "w")
    worker = Worker("w", b, opener, ComputeThread("w"))
    task = asyncio.create_task(worker.run())
    undecodable = decoded = 0
    try:
        await a.send(Channel.RELIABLE, plan_frame(SESSION))
        assert isinstance(codec.decode((await asyncio.wait_for(a.recv(), 10))[1]), PlanReady)
        for frame in (*inputs(SESSION, 1, 2**32 - 2), *inputs(SESSION, 2, 64),   # beyond the context
                      *inputs(SESSION, 3, _FailingShard.FAIL_AT)):                   # the shard fails on it
            await a.send(Channel.UNRELIABLE, frame)
        fuzz = FrameFuzzer(seed=3)
        for i in range(3000):
            _, frame = fuzz.frame()
            got = _outcome(frame)
            if isinstance(got, Bye):
                continue                     # a valid Bye ends the session, as it should
            undecodable += isinstance(got, WireError)
            decoded += not isinstance(got, WireError)
            await a.send(Channel.RELIABLE if i % 2 or len(frame) > 1100 else Channel.UNRELIABLE, frame)
            if i % 100 == 0:
                await asyncio.sleep(0)
        for frame in issue_examples().values():
            await a.send(Channel.RELIABLE, frame)
            undecodable += 1
        await a.send(Channel.RELIABLE, plan_frame(9, sha="f" * 64))      # opening the model fails
        await a.send(Channel.RELIABLE, plan_frame(9))
        replies: collections.Counter[str] = collections.Counter()
        async with asyncio.timeout(30):
            while True:
                msg = _outcome((await a.recv())[1])
                replies[type(msg).__name__ + (f":{msg.code}" if isinstance(msg, ErrorReply) else "")] += 1
                if isinstance(msg, PlanReady) and msg.session == 9:
                    break
        for frame in inputs(9, 1, 0):
            await a.send(Channel.UNRELIABLE, frame)
        async with asyncio.timeout(10):
            while not isinstance(msg := _outcome((await a.recv())[1]), Partial) or msg.session != 9:
                pass
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    counters = worker.counters
    assert counters["malformed"] >= undecodable + 2          # and the two inputs beyond the context
    assert counters["malformed"] <= undecodable + 2 + decoded
    assert counters["rejected"] >= 1 and counters["bad_plan"] >= 1
    assert replies["ErrorReply:decode_error"] + replies["ErrorReply:version_mismatch"] > 1000
    assert replies["ErrorReply:bad-plan"] >= 1


# --- a coordinator ----------------------------------------------------------------------------


async def test_a_garbage_answering_peer_does_not_crash_the_coordinator(stories) -> None:
    """A fake peer (it holds no swarm key: it just answers on its link) replies to the Plan with
    hostile frames and well-formed nonsense (a PlanReady of another session among them); the
    coordinator's receive loop counts and drops each, and still takes the real PlanReady after them."""
    layout = GroupLayout.from_config(stories.config)
    plan = PlacementPlan.split(layout, ["c", "w"], coordinator="c", shares=[0, 1])
    compute = ComputeThread("c")
    a, b = memory_link_pair("c", "w")
    coordinator = Coordinator(trunk=Trunk(stories), local=None, compute=compute, links={"w": a}, plan=plan,
                              options=SessionOptions(setup_timeout_s=30), session=5)
    garbage = [f for _, f in zip(range(2000), (f for _, f in FrameFuzzer(seed=5)), strict=False)]
    garbage += list(issue_examples().values())
    outcomes = [_outcome(f) for f in garbage]
    keep = [f for f, m in zip(garbage, outcomes, strict=True)
            if not isinstance(m, ErrorReply | PlanReady)]       # an ErrorReply is a valid refusal of the plan
    nonsense = [PlanReady(session=6, weight_bytes=1, load_s=0.0), Partial(session=5, step=99, layer=0, part=0,
                chunk=0, n_data=1, n_parity=0, offset=0, norms=np.zeros(0, np.float16),
                data=np.zeros(4, np.float32)), NeedInput(session=5, step=1, layer=0, part=0),
                Resend(session=5, step=1, layer=0, part=0, chunks=()), Heartbeat(seq=1, sent_s=1.0),
                WeightsWanted(session=5, groups=(2**32 - 1, 1, 2**32 - 1))]
    keep += [codec.encode(m) for m in nonsense]

    async def fake_peer() -> None:
        await b.recv()                                          # the Plan
        for i, frame in enumerate(keep):
            await b.send(Channel.RELIABLE if i % 2 or len(frame) > 1100 else Channel.UNRELIABLE, frame)
        await b.send(Channel.RELIABLE, codec.encode(PlanReady(session=5, weight_bytes=1, load_s=0.0)))

    peer = asyncio.create_task(fake_peer())
    try:
        await coordinator.start()        # the PlanReady came last: every frame before it was read
        await peer
        undecodable = sum(isinstance(_outcome(f), WireError) for f in keep)
        assert coordinator.counters["malformed"] == undecodable > 1000
        assert coordinator.counters["stale"] >= 2               # the other session's PlanReady, the old Partial
    finally:
        await coordinator.aclose()
        await asyncio.to_thread(compute.close)


async def test_a_peer_that_only_sends_garbage_fails_the_setup_with_a_project_error(stories) -> None:
    layout = GroupLayout.from_config(stories.config)
    plan = PlacementPlan.split(layout, ["c", "w"], coordinator="c", shares=[0, 1])
    compute = ComputeThread("c")
    a, b = memory_link_pair("c", "w")
    coordinator = Coordinator(trunk=Trunk(stories), local=None, compute=compute, links={"w": a}, plan=plan,
                              options=SessionOptions(setup_timeout_s=1), session=5)
    examples = list(issue_examples().values())

    async def fake_peer() -> None:
        await b.recv()
        for frame in examples:
            await b.send(Channel.RELIABLE, frame)

    peer = asyncio.create_task(fake_peer())
    try:
        with pytest.raises(TransportError, match="did not load their groups in time"):
            await coordinator.start()
        assert coordinator.counters["malformed"] == len(examples)
    finally:
        await peer
        await coordinator.aclose()
        await asyncio.to_thread(compute.close)
