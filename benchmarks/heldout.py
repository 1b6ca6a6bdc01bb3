"""Held-out evaluation text: English prose from CPython's bundled ``pydoc_data.topics``.

It ships with every Python 3.11 (no download), is not model output, and was never used to tune
anything in halo-p2p. The calibration text of the predictor (issue #5) comes from elsewhere.
"""

from __future__ import annotations

from pydoc_data.topics import topics

HELDOUT_TOPICS = ("assert", "break", "exceptions", "with", "lambda", "global", "pass", "while")


def heldout_text(n_topics: int = len(HELDOUT_TOPICS)) -> str:
    """The concatenated topics, whitespace-normalised."""
    return "\n\n".join(" ".join(topics[t].split()) for t in HELDOUT_TOPICS[:n_topics])
