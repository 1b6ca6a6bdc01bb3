"""Whether a worker fell silent: the coordinator's lost-peer rule (issue #12).

A link that sends heartbeats (:class:`~halo_p2p.net.webrtc.WebRtcLink`: every 0.5 s, acked)
tells when it last heard its peer (:class:`Heartbeats`); it closes itself only after
``dead_after_s`` (3 s) of silence. The coordinator does not wait that long in a decode step: a
worker that owes an answer and whose link heard nothing, no answer and no heartbeat, for
``silence_s`` (default 1 s, :attr:`~halo_p2p.session.coordinator.SessionOptions.peer_silence_s`)
is lost at once. A link without heartbeats (an emulated memory link) shows life only by the
answers themselves: there a worker is lost when its answer is ``silence_s`` overdue and nothing
else arrived from it meanwhile.

Prompts (and the replay of a re-plan) are left to the link's dead time: a worker sending a large
answer over the reliable channel can be silent for a retransmission timeout (at least 1 s, stock
SCTP) with its heartbeats queued behind the answer, and a long prompt's share may take longer
than ``silence_s`` to compute on a link without heartbeats.

Pure: times are passed in (the caller's clock, and ``time.monotonic()`` for the link's stamp).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Heartbeats", "heard_s", "silent_since"]


@runtime_checkable
class Heartbeats(Protocol):
    """A link that hears its peer's heartbeats (:class:`~halo_p2p.net.webrtc.WebRtcLink`)."""

    @property
    def last_heard_s(self) -> float:
        """``time.monotonic()`` when the last frame of any kind (heartbeats included) arrived."""
        ...


def heard_s(link: object, *, now_s: float, mono_s: float) -> float | None:
    """When ``link`` last heard its peer, on the caller's clock; None if it has no heartbeats.

    Args:
        link: any link.
        now_s: the caller's clock now (e.g. ``loop.time()``), seconds.
        mono_s: ``time.monotonic()`` now, seconds.
    """
    if not isinstance(link, Heartbeats):
        return None
    return now_s - max(0.0, mono_s - link.last_heard_s)


def silent_since(*, link_heard_s: float | None, asked_s: float, answered_s: float | None) -> float:
    """Since when a worker that owes a decode step's answer has been silent.

    Args:
        link_heard_s: its link's last sign of life (:func:`heard_s`), None without heartbeats.
        asked_s: when the input it owes an answer to was sent.
        answered_s: when the last chunk of any of its answers arrived (None: none yet).

    Returns:
        With heartbeats, the link's last sign of life (it heard neither an answer nor a
        heartbeat since). Without, the later of ``asked_s`` and ``answered_s``.
    """
    if link_heard_s is not None:
        return link_heard_s
    return asked_s if answered_s is None else max(asked_s, answered_s)
