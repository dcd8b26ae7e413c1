"""`runner.executor: ray` (pipeline/executors.py's RayExecutor): a stage's units on Ray actors.

The driver (runner.run_stage) keeps the plan and the finishing: the fingerprint, which shards
are pending, the stats and the manifest. This module only processes pending shards: each on an
actor that builds the stage once per stage run (the engine inside is the actor process's kept
engine, engines.kept_engine, so it lives across stages and rounds), at most `runner.workers`
shards in flight. An actor of a stage that runs a model asks Ray for `runner.gpus_per_worker`
GPUs; the others for one CPU. A shard writes its part files atomically and its marker last
(stage.process_unit), so a worker that dies mid-shard is restarted and the shard retried
(`runner.retries` times) with no row lost or duplicated.

Actors are kept in this process between stage runs, one pool per resource shape;
`release_workers()` ends them (iterate does before training on a GPU machine). Every actor must
see the run directory: a probe file written by the driver is checked from each, and a node that
cannot see it fails the stage with a message saying so.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.engines import release_engine
from pipeline.stage import (
    MARKERS,
    Stage,
    StageFailed,
    StageJob,
    load_stage_class,
    make_stage,
    process_unit,
    stage_ref,
)

log = logging.getLogger(__name__)

_pools: dict[tuple[float, float], list[Any]] = {}  # (cpus, gpus) -> live actor handles


class ShardWorker:
    """A Ray actor's body: holds the current stage run's Stage, processes its shards."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.stage: Stage | None = None

    def host(self) -> str:
        return socket.gethostname()

    def sees(self, paths: list[str]) -> list[str]:
        """The paths of `paths` this worker's node cannot see."""
        return [p for p in paths if not Path(p).exists()]

    def process(self, ref: str, config: dict[str, Any], side_dirs: dict[str, Path],
                paths: list[Path], out_dir: Path, index: int, fp: str) -> int:
        """Processes one unit (a shard, or every shard of a whole-input stage), building the stage
        first when this worker holds another stage run's (or none: a restarted worker)."""
        key = f"{ref} {fp}"
        if self.key != key:
            self.close()
            self.stage = make_stage(load_stage_class(ref), Config.model_validate(config),
                                    side_dirs)
            self.key = key
        process_unit(self.stage, paths, out_dir, index, fp)
        return index

    def close(self) -> None:
        if self.stage is not None:
            self.stage.close()
        self.stage, self.key = None, None

    def release(self) -> int:
        """Closes the stage and this process's kept engine; returns the process id."""
        self.close()
        release_engine()
        return os.getpid()


def run_units(job: StageJob, pending: list[int], workers: int,
              on_done: Callable[[], Any]) -> None:
    """Processes units `pending` of `job` on at most `workers` Ray actors; calls `on_done()`
    after each. Raises the stage's own error (StageFailed, ...) as it is."""
    stage_cls, config, out_dir, fp = job.stage_cls, job.config, job.out_dir, job.fingerprint
    units = [(job.units[i], i) for i in pending]
    ray = _connect(config.runner.address)
    gpus = config.runner.gpus_per_worker if stage_cls.runs_model(config) else 0.0
    actors = _actors(ray, min(workers, len(units)), gpus, config.runner.retries)
    _check_visible(ray, actors, out_dir, units[0][0][0])
    args = (stage_ref(stage_cls), config.model_dump(mode="json"), job.side_dirs)
    queue, in_flight, idle = list(units), {}, list(actors)
    try:
        while queue or in_flight:
            while queue and idle:
                actor, (paths, index) = idle.pop(), queue.pop(0)
                in_flight[actor.process.remote(*args, paths, out_dir, index, fp)] = actor, index
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            actor, index = in_flight.pop(done)
            idle.append(actor)
            _get(ray, done, stage_cls.name, index, config.runner.retries)
            on_done()
    finally:
        if in_flight:  # (no shard writes after we return)
            ray.wait(list(in_flight), num_returns=len(in_flight))
        try:
            ray.get([a.close.remote() for a in actors])
        except ray.exceptions.RayActorError:
            release_workers()


def release_workers(timeout_s: float = 120.0) -> list[int]:
    """Ends every kept actor and returns their process ids: each first closes its stage and its
    engine (vLLM's shutdown waits for its engine-core processes), then is killed, and this
    returns once Ray reports each one dead and its process has exited, so a DeepSpeed launch
    that follows finds the GPUs free (`ray.kill` alone returns before the process, and its GPU
    memory, is gone; Ray reports an actor dead before its process has finished exiting)."""
    if not _pools:
        return []
    import ray

    actors = [a for pool in _pools.values() for a in pool]
    _pools.clear()
    try:
        pids = ray.get([a.release.remote() for a in actors], timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        pids = []  # one failed, died or hangs: killed below all the same
    for actor in actors:
        ray.kill(actor, no_restart=True)
    deadline = time.time() + timeout_s
    for actor in actors:
        while time.time() < deadline:
            try:
                ray.get(actor.host.remote(), timeout=5)
            except ray.exceptions.RayActorError:
                break  # dead
            except ray.exceptions.GetTimeoutError:
                continue  # still dying
            time.sleep(0.2)
    for pid in pids:
        while time.time() < deadline and _process_running(pid):
            time.sleep(0.1)
    return pids


def _process_running(pid: int) -> bool:
    """Whether process `pid` is there and not a zombie (Linux's /proc; elsewhere: False, and
    release_workers trusts Ray)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _connect(address: str):
    try:
        import ray
    except ImportError as e:
        raise ImportError("runner.executor=ray needs Ray: pip install 'ray[default]' (make setup "
                          "installs it)") from e
    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, log_to_driver=False)
        else:  # a Ray instance on this machine; its workers import what this process imports
            path = os.pathsep.join(p for p in sys.path if p)
            ray.init(include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
        log.info("ray: %s", ray.cluster_resources())
    return ray


def _actors(ray, n: int, gpus: float, retries: int) -> list[Any]:
    """`n` live actors asking for `gpus` GPUs each (one CPU when none), from the kept pool."""
    cpus = 0.0 if gpus else 1.0
    pool = _pools.setdefault((cpus, gpus), [])
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=retries,
                        max_task_retries=retries)(ShardWorker)
    while len(pool) < n:
        pool.append(remote.remote())
    return pool[:n]


def _check_visible(ray, actors: list[Any], out_dir: Path, an_input: Path) -> None:
    """StageFailed naming the node when a worker cannot see the output directory (a probe
    written there now) or the input."""
    probe = out_dir / MARKERS / f".probe-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.touch()
    try:
        paths = [str(probe), str(an_input)]
        for actor, missing in zip(actors, ray.get([a.sees.remote(paths) for a in actors])):
            if missing:
                host = ray.get(actor.host.remote())
                raise StageFailed(f"Ray worker on {host} cannot see {missing[0]}: with "
                                  "runner.executor=ray, inputs and outputs must be on a "
                                  "filesystem every node mounts at the same path (NFS, Lustre, "
                                  "...)")
    finally:
        probe.unlink(missing_ok=True)


def _get(ray, ref, stage: str, index: int, retries: int) -> Any:
    """ray.get, raising a task's own exception as its own type (StageFailed stays StageFailed),
    and StageFailed when the worker died more often than it may be restarted."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        release_workers()
        raise StageFailed(f"stage {stage!r}: the Ray worker of shard {index} died "
                          f"{retries + 1} times (runner.retries={retries}): {e}") from None
