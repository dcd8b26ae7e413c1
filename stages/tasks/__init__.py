"""Task plugins (see base.py): `get_task(cfg.task)`; arith and math register themselves."""

from stages.tasks.base import TASKS, Task, get_task, register, task_of

__all__ = ["TASKS", "Task", "get_task", "register", "task_of"]
