"""Where a stage's pending units run (`runner.executor`): one interface, three executors.

    executor = executor_for(config, workers)        # Serial, ProcessPool or Ray
    executor.run(job, pending, on_done)             # processes units `pending` of the job

`local` is a SerialExecutor with one worker (the stage is built in this process, once, and
only when a unit is pending: a stage may load a model) and a ProcessPoolExecutor with more
(spawned processes, each building the stage once); `ray` is pipeline/ray_executor.py's actors.
Each processes a unit with pipeline/stage.py's `process_unit`, which writes its marker last,
so every executor leaves the same files, and the runner finishes the directory the same way.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor as _Pool
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config
from pipeline.stage import Stage, StageJob, load_stage_class, make_stage, process_unit, stage_ref


class Executor(Protocol):
    def run(self, job: StageJob, pending: list[int], on_done: Callable[[], Any]) -> None:
        """Processes units `pending` of `job` into its directory, calling `on_done()` after
        each; raises the stage's own error (StageFailed, ...)."""


class SerialExecutor:
    """Every unit in this process, one stage object for all."""

    def run(self, job: StageJob, pending: list[int], on_done: Callable[[], Any]) -> None:
        stage = make_stage(job.stage_cls, job.config, job.side_dirs)
        try:
            for i in pending:
                process_unit(stage, job.units[i], job.out_dir, i, job.fingerprint)
                on_done()
        finally:
            stage.close()


class ProcessPoolExecutor:
    """Units on `workers` spawned processes of this machine, a stage object in each."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def run(self, job: StageJob, pending: list[int], on_done: Callable[[], Any]) -> None:
        with _Pool(self.workers, mp_context=multiprocessing.get_context("spawn"),
                   initializer=_init_worker,
                   initargs=(stage_ref(job.stage_cls), job.config.model_dump(mode="json"),
                             job.side_dirs)) as pool:
            futures = [pool.submit(_worker_unit, job.units[i], job.out_dir, i, job.fingerprint)
                       for i in pending]
            for future in as_completed(futures):
                future.result()
                on_done()


class RayExecutor:
    """Units on Ray actors, at most `workers` in flight (pipeline/ray_executor.py)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def run(self, job: StageJob, pending: list[int], on_done: Callable[[], Any]) -> None:
        from pipeline.ray_executor import run_units

        run_units(job, pending, self.workers, on_done)


def executor_for(config: Config, workers: int) -> Executor:
    """The executor `runner.executor` names, for `workers` workers."""
    if config.runner.executor == "ray":
        return RayExecutor(workers)
    return SerialExecutor() if workers == 1 else ProcessPoolExecutor(workers)


_WORKER_STAGE: Stage | None = None


def _init_worker(ref: str, config: dict[str, Any], side_dirs: dict[str, Path]) -> None:
    global _WORKER_STAGE
    _WORKER_STAGE = make_stage(load_stage_class(ref), Config.model_validate(config), side_dirs)


def _worker_unit(paths: list[Path], out_dir: Path, index: int, fp: str) -> None:
    assert _WORKER_STAGE is not None
    process_unit(_WORKER_STAGE, paths, out_dir, index, fp)
