"""Switch: a process-wide setting with a default, changed for the length of a block.

The trace store (`trace.trace_store`), the CPU linear kernel (`linear.linear_kernel`), the CPU
one-position attention (`attention.cpu_attention`), row-by-row prefill (`trace.row_by_row`) and its
packed rows (`trace.packed_rows`) are such settings: the default is what users get, and
benchmarks and equivalence tests switch to the old path for a block to measure both in one run.
`scoped` does the same for a context variable: a value each thread (a server's worker) sets for
its own block, such as a token listener or packed rows.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Generic, Iterator, Sequence, TypeVar

from diffmas.errors import DiffmasError

T = TypeVar("T")


class Switch(Generic[T]):
    """`value` is the current setting; `using(x)` sets it for a block and restores it after."""

    def __init__(self, what: str, default: T, choices: Sequence[T]):
        self.what, self.choices = what, tuple(choices)
        self.value: T = default

    def set(self, value: T) -> None:
        """Set it for the rest of the process (a command-line option)."""
        self._check(value)
        self.value = value

    @contextlib.contextmanager
    def using(self, value: T) -> Iterator[None]:
        self._check(value)
        before, self.value = self.value, value
        try:
            yield
        finally:
            self.value = before

    def _check(self, value: T) -> None:
        if value not in self.choices:
            names = ", ".join(str(c) for c in self.choices)
            raise DiffmasError(f"{self.what} {value!r}: choose one of {names}")


@contextlib.contextmanager
def scoped(var: ContextVar[T], value: T) -> Iterator[None]:
    """Set a context variable to `value` for the length of a block, and restore it after."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
