"""Computations in pieces: a generator that yields between pieces (the serving engine runs the other
requests' decode steps there) and returns its result; ``run_steps`` runs one through to the end.

The vision tower yields every few blocks (``VisionTransformer.steps``), the decoder every few layers
(``DeepseekV2ForCausalLM.forward_steps``): the same operations in the same order as one call.
"""

from __future__ import annotations

from typing import Generator, TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]


def run_steps(steps: Steps[T]) -> T:
    """Run a stepwise computation to its end and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
