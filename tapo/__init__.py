"""Orchestration: the flows (a round, iterate, the cold start, evaluation, compare), the
command line and the views of a run; above the stages and the trainers."""
