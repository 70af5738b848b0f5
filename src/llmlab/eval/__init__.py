"""Evaluation: tasks described by YAML files (`taskfile`; the shipped ones in the `tasks/` folder), their scores
(`scoring`), a sandbox for generated code (`sandbox`), the batched runner behind `llmlab evaluate` (`runner`) and an
lm-evaluation-harness adapter (`harness`).
"""

from llmlab.eval.runner import TextModel, evaluate_tasks, format_table, run_task
from llmlab.eval.taskfile import Task, list_tasks, load_task, load_tasks

__all__ = ["Task", "TextModel", "evaluate_tasks", "format_table", "list_tasks", "load_task", "load_tasks", "run_task"]
