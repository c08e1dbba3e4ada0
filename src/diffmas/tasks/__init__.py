"""Benchmarks: loading examples, asking (prompt + answer format) and scoring.

    from diffmas.tasks import get_task, list_tasks
    task = get_task("gsm8k")
    examples = task.load("test", limit=20)

Built-in tasks register themselves when `diffmas.tasks.families` is imported (done here).
Data files are found as described in `diffmas.tasks.data`; custom JSONL tasks in `families`.
"""

from diffmas.tasks.base import AnswerType, Example, Score
from diffmas.tasks.data import TaskError
from diffmas.tasks.families import ChoiceTask, CodeTask, MathTask, jsonl_task  # registers the built-in tasks
from diffmas.tasks.registry import Task, get_task, list_tasks, register_task
from diffmas.tasks.relay import RelayTask  # registers the communication tasks

__all__ = [
    "AnswerType",
    "ChoiceTask",
    "CodeTask",
    "Example",
    "MathTask",
    "RelayTask",
    "Score",
    "Task",
    "TaskError",
    "get_task",
    "jsonl_task",
    "list_tasks",
    "register_task",
]
