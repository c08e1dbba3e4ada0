"""The Hugging Face backend: the method runs as it always has, every agent on the local trace."""

from __future__ import annotations

from typing import Mapping, Sequence

from diffmas.methods import Method, RunResult


class HFBackend:
    name = "hf"

    def check(self, method: Method) -> None:
        """Every method and topology runs here."""

    def run_batch(
        self,
        method: Method,
        questions: Sequence[str],
        format: str = "",
        seeds: Sequence[int] | None = None,
        privates: Sequence[Mapping[str, str]] | None = None,
    ) -> list[RunResult]:
        return method.run_batch(questions, format=format, seeds=seeds, privates=privates)
