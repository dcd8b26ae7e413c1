"""The CPU testbed: the arithmetic task's base model, built from its corpus (base.py); the
arith task itself is a task plugin (stages/tasks/arith.py)."""
