"""Evaluation: running a method over a task's examples, metrics, comparison and reports."""

from diffmas.evaluate.records import run_examples, sample_seed

__all__ = ["run_examples", "sample_seed"]
