"""Computations in pieces: a generator that yields between pieces (the serving engine runs the other
requests' decode steps there) and returns its result; ``run_steps`` runs one through to the end.

The vision tower yields every few blocks (``VisionTransformer.steps``), the decoder every few layers
(``DeepseekV2ForCausalLM.forward_steps``): the same operations in the same order as one call.
"""

from __future__ import annotations

from typing import Generator, Optional, TypeVar

T = TypeVar("T")

Steps = Generator[None, None, T]


def piece_ends(done: int, per_step: Optional[int], total: int) -> bool:
    """Whether a stepwise loop over ``total`` items yields after its first ``done``: every ``per_step`` items
    (None or 0: never), but not after the last."""
    return bool(per_step) and done % per_step == 0 and done < total


def advance(steps: Steps[T]) -> tuple[bool, Optional[T]]:
    """Run one piece: (False, None) where the computation yielded, (True, its result) where it ended."""
    try:
        next(steps)
    except StopIteration as done:
        return True, done.value
    return False, None


def run_steps(steps: Steps[T]) -> T:
    """Run a stepwise computation to its end and return its result."""
    while True:
        finished, result = advance(steps)
        if finished:
            return result
