"""Where the heavy steps run: this machine's processes (the default), or a Ray cluster. Plain Python; no Dagster.

Per-file work maps a module-level function over tasks, one file per task. Every task writes its output under a
temporary name and renames it, so a task run twice (Ray retries the task of a worker or node it lost) writes the
same file again: nothing is lost and nothing is duplicated. A task that fails names the step, the task and, on a
cluster, the node it ran on. The reductions (thresholds, centroids, counts) stay with the caller.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from datacomp_assets.core import settings
from datacomp_assets.core.processes import spawn_pool

Task = TypeVar("Task")
Result = TypeVar("Result")


class TaskFailed(RuntimeError):
    """A task of a step failed on the engine; the message names the step, the task and the node."""


@dataclass(frozen=True)
class Engine:
    ray_address: str = ""      # empty: this machine; else what `ray.init(address=...)` takes
    task_retries: int = 3      # Ray's retries of a task whose worker or node died
    training_nodes: int = 1    # nodes one training spans on the cluster (torchrun, c10d rendezvous)

    @property
    def on_ray(self) -> bool:
        return bool(self.ray_address)

    def describe(self) -> str:
        return f"the Ray cluster at {self.ray_address}" if self.on_ray else "this machine"

    def connect(self) -> None:
        """Join the cluster as a driver (once per process)."""
        settings.apply_ray_defaults()
        import ray

        if ray.is_initialized():
            return
        try:
            # Ray itself retries an address where nothing listens for minutes; a closed port is known at once.
            _reachable(self.ray_address)
            # What tasks print stays in Ray's logs on each node (the dashboard shows them): forwarded, it would
            # bypass the run's log and land in the middle of the terminal's progress lines.
            ray.init(address=self.ray_address, logging_level="warning", configure_logging=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as err:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {self.ray_address!r} ({err}). Start it (`ray start --head` on "
                f"the head node, or KubeRay), or unset {settings.DATACOMP_RAY_ADDRESS.name} (the `engine` "
                "resource's ray_address) to run on this machine") from err

    def gpus_per_node(self) -> int:
        """GPUs of the cluster's node with the fewest, among those that have any (0: no GPU in the cluster)."""
        import ray

        self.connect()
        return int(min((n["Resources"].get("GPU", 0) for n in ray.nodes()
                        if n["Alive"] and n["Resources"].get("GPU", 0)), default=0))

    def task_slots(self, gpus: float = 0.0) -> int:
        """How many tasks of `gpus` GPUs each (where the cluster has GPUs; else of one CPU) the cluster runs at
        once; 1 on this machine."""
        if not self.on_ray:
            return 1
        import ray

        self.connect()
        total = ray.cluster_resources()
        if gpus and total.get("GPU", 0):
            return max(1, int(total["GPU"] / gpus))
        return max(1, int(total.get("CPU", 1)))

    def task_groups(self, items: list, gpus: float = 0.0, per_slot: int = 2) -> list[list]:
        """`items` in contiguous groups, one task each, so that a task that loads a model scores several files with
        it: one item a group here (the model is loaded once per process, see `process_cache`), and on the cluster
        about `per_slot` groups for each task the cluster runs at once (a GPU task's worker exits when it ends)."""
        if not self.on_ray:
            return [[item] for item in items]
        n = max(1, min(len(items), self.task_slots(gpus) * per_slot))
        size = -(-len(items) // n)
        return [items[i:i + size] for i in range(0, len(items), size)]

    def map_unordered(self, work: Callable[[Task], Result], tasks: Iterable[Task], processes: int = 2,
                      step: str = "", gpus: float = 0.0) -> Iterator[Result]:
        """`work(task)` for every task, results as they finish: on the cluster, one Ray task each; here, in
        `processes` spawned processes (the caller may be a threaded Dagster process), or in this one if 1.

        `gpus`: on a cluster that has GPUs, each Ray task requests this many (a fraction shares one GPU between
        tasks) and Ray sets its CUDA_VISIBLE_DEVICES; on one without, or with 0, each requests one CPU."""
        tasks = list(tasks)
        if not tasks:
            return
        if self.on_ray:
            yield from self._ray_map(work, tasks, step, gpus)
        elif processes <= 1 or len(tasks) == 1:
            for task in tasks:
                yield _named(work, task, step)
        else:
            with spawn_pool(min(processes, len(tasks)), step or "a process pool") as pool:
                yield from pool.imap_unordered(_NamedWork(work, step), tasks)

    @contextmanager
    def session(self, processes: int = 2, step: str = "") -> Iterator["Session"]:
        """For a step that maps several times in a row: `map_unordered` as above, with this machine's worker
        processes started once (at the first map of more than one task) and kept until the block ends; spawning
        them costs seconds each time. On a cluster, every map is Ray tasks as above."""
        with ExitStack() as stack:
            yield Session(self, processes, step, stack)

    def _ray_map(self, work: Callable[[Task], Result], tasks: list[Task], step: str,
                 gpus: float = 0.0) -> Iterator[Result]:
        import ray

        self.connect()
        request = {"num_gpus": gpus} if gpus and self.gpus_per_node() else {"num_cpus": 1}
        remote = ray.remote(max_retries=self.task_retries, **request)(_named_on_node)
        pending = {remote.remote(work, task, step): task for task in tasks}
        try:
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ready)
                try:
                    yield ray.get(ready)
                except ray.exceptions.RayError as err:
                    if isinstance(getattr(err, "cause", None), TaskFailed):  # already names the step and node
                        raise TaskFailed(str(err.cause)) from None
                    raise TaskFailed(f"{step}: task {task!r} failed: {ray_error_message(err, self.task_retries)}") \
                        from None
        finally:
            for ref in pending:  # a failure, or a consumer that stopped early: nothing keeps running
                ray.cancel(ref, force=True)


_PROCESS_CACHE: dict = {}


def process_cache(key: tuple, load: Callable[[], Any]) -> Any:
    """`load()`, kept for the next task this process runs with the same `key` (one entry: a process holds one
    task kind's models at a time). A key should name what the value was loaded from, a checkpoint's size and
    modification time included, so a file rewritten since is loaded again."""
    if key not in _PROCESS_CACHE:
        _PROCESS_CACHE.clear()
        _PROCESS_CACHE[key] = load()
    return _PROCESS_CACHE[key]


def clear_process_cache() -> None:
    """Let go of what `process_cache` holds here (a step's process, once its tasks are done)."""
    _PROCESS_CACHE.clear()


def file_key(path: str | os.PathLike | None) -> tuple:
    """A file's path, size and modification time (a cache key that changes when the file is rewritten)."""
    if path is None:
        return (None,)
    stat = os.stat(path)
    return (str(path), stat.st_size, stat.st_mtime_ns)


class Session:
    """`Engine.session`'s maps: one process pool for all of them (here), or Ray tasks (on a cluster)."""

    def __init__(self, engine: Engine, processes: int, step: str, stack: ExitStack):
        self.engine, self.processes, self.step, self._stack, self._pool = engine, processes, step, stack, None

    def map_unordered(self, work: Callable[[Task], Result], tasks: Iterable[Task], step: str = "") -> Iterator[Result]:
        tasks, step = list(tasks), step or self.step
        if self.engine.on_ray or self.processes <= 1 or len(tasks) <= 1:
            yield from self.engine.map_unordered(work, tasks, self.processes, step)
            return
        if self._pool is None:
            self._pool = self._stack.enter_context(spawn_pool(self.processes, self.step or "a process pool"))
        yield from self._pool.imap_unordered(_NamedWork(work, step), tasks)


def _reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError unless something listens at `address` (`host:port` or `ray://host:port`; `auto`, which
    Ray resolves itself, is not checked)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port}: {err}") from None


def ray_error_message(err: BaseException, retries: int) -> str:
    """What went wrong on the cluster, in one line that names the node where Ray says."""
    import ray

    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if err.cause is not None else err
        node = "" if isinstance(cause, TaskFailed) else f" on the node at {err.ip} (pid {err.pid})"
        return f"{type(cause).__name__}{node}: {cause}"
    if isinstance(err, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OwnerDiedError)):
        return (f"its worker died {retries + 1} times (a node lost, or a process killed for memory); Ray says: "
                f"{str(err).splitlines()[0]}")
    return f"{type(err).__name__}: {err}"


class _NamedWork:
    """`work` for a process pool (picklable), failures named by step and task."""

    def __init__(self, work: Callable, step: str):
        self.work, self.step = work, step

    def __call__(self, task: Any) -> Any:
        return _named(self.work, task, self.step)


def _named(work: Callable, task: Any, step: str) -> Any:
    try:
        return work(task)
    except Exception as err:
        raise TaskFailed(f"{step}: task {task!r} failed: {type(err).__name__}: {err}") from err


def _named_on_node(work: Callable, task: Any, step: str) -> Any:
    """Runs as a Ray task: `work(task)`, a failure named with the node it ran on."""
    import ray

    try:
        return work(task)
    except Exception as err:
        context = ray.get_runtime_context()
        raise TaskFailed(f"{step}: task {task!r} failed on node {context.get_node_id()[:12]} "
                         f"({ray.util.get_node_ip_address()}): {type(err).__name__}: {err}") from err
