"""halo-p2p: loss-tolerant, neuron-group tensor-parallel LLM inference across edge peers."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
