"""Where sweep workers run: spawned local processes (:class:`LocalPool`) or Ray actors (:class:`RayPool`)."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import warnings

import torch

from ..errors import LayercritError, show_warning
from .config import SweepConfig
from .store import Unit
from .worker import Outcome, SweepWorker, _cpu_count, _one_line

# ---------------------------------------------------------------- local processes


class _LocalPool:
    """``workers`` spawned processes (default: one per GPU, else one), each with its own task queue."""

    def __init__(self, config: SweepConfig, workers: int | None, units: int):
        gpus = torch.cuda.device_count() if config.device is None else 0
        self.size = min(workers or max(gpus, 1), units)
        self._devices = [f"cuda:{i % gpus}" if gpus else None for i in range(self.size)]
        self._threads = max(1, _cpu_count() // self.size)  # the cores split among the workers
        self._config = config
        self._context = multiprocessing.get_context("spawn")
        self._results = self._context.Queue()
        self._tasks: list = [None] * self.size
        self._processes: list = [None] * self.size
        self._inflight: dict[int, Unit] = {}
        for i in range(self.size):
            self._start(i)

    def _start(self, i: int) -> None:
        self._tasks[i] = self._context.Queue()
        self._processes[i] = self._context.Process(
            target=_local_worker, name=f"layercrit-worker-{i}", daemon=True,
            args=(i, self._config, self._devices[i], self._threads, self._tasks[i], self._results),
        )
        self._processes[i].start()

    def submit(self, i: int, unit: Unit) -> None:
        self._inflight[i] = unit
        self._tasks[i].put(unit)

    def next_result(self) -> tuple[int, Outcome]:
        while True:
            try:
                i, outcome = self._results.get(timeout=1.0)
                del self._inflight[i]
                return i, outcome
            except queue.Empty:
                for i, unit in list(self._inflight.items()):
                    process = self._processes[i]
                    if not process.is_alive():
                        del self._inflight[i]
                        self._start(i)
                        return i, Outcome(unit, f"local-{i}", 0.0,
                                          error=f"worker process died (exit code {process.exitcode})")

    def close(self) -> None:
        for i, process in enumerate(self._processes):
            if process.is_alive() and i not in self._inflight:
                self._tasks[i].put(None)
        for process in self._processes:
            process.join(timeout=10 if not self._inflight else 0)
            if process.is_alive():
                process.kill()  # interrupted mid-unit: the unit is not committed and the next run redoes it


def _local_worker(index: int, config: SweepConfig, device: str | None, threads: int, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which stops the workers
    parent = multiprocessing.parent_process()

    def exit_with_parent() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # the driver was killed: its unit is lost anyway, stop computing

    threading.Thread(target=exit_with_parent, daemon=True).start()
    warnings.showwarning = show_warning  # one line on the sweep's stderr, as the driver's own warnings
    warnings.simplefilter("once", UserWarning)  # a model's warning once, not once per unit of it
    worker = SweepWorker(config, f"local-{index}", device=device, threads=threads)
    while (unit := tasks.get()) is not None:
        results.put((index, worker.run(unit)))


# ---------------------------------------------------------------- Ray


class _RayPool:
    """Ray actors running :class:`SweepWorker`: one per GPU of the cluster, else one per CPU (or ``workers``).

    A dead actor (node lost) is restarted by Ray and its unit retried; past that, the unit is recorded as failed
    and a new actor takes the slot.
    """

    def __init__(self, config: SweepConfig, workers: int | None, units: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise LayercritError("--backend ray needs Ray: pip install 'layercrit[ray]'") from None
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            except ConnectionError as error:
                raise LayercritError(f"cannot join the Ray cluster at {address}: {_one_line(error)}") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        self.size = min(workers or gpus or max(int(cpus), 1), units)
        if gpus and config.device in (None, "cuda"):
            self._options = {"num_gpus": 1, "num_cpus": min(1.0, cpus / self.size)}
            self._threads = None
        else:
            self._options = {"num_cpus": cpus / self.size}
            self._threads = max(1, int(cpus // self.size))
        self._config = config
        self._actor_class = ray.remote(SweepWorker)
        self._actors = [self._new_actor(i) for i in range(self.size)]
        self._futures: dict = {}

    def _new_actor(self, i: int):
        return self._actor_class.options(max_restarts=2, max_task_retries=2, **self._options).remote(
            self._config, f"ray-{i}", threads=self._threads)

    def submit(self, i: int, unit: Unit) -> None:
        self._futures[self._actors[i].run.remote(unit)] = (i, unit)

    def next_result(self) -> tuple[int, Outcome]:
        ray = self._ray
        (ref,), _ = ray.wait(list(self._futures), num_returns=1)
        i, unit = self._futures.pop(ref)
        try:
            return i, ray.get(ref)
        except ray.exceptions.RayError as error:
            self._actors[i] = self._new_actor(i)
            return i, Outcome(unit, f"ray-{i}", 0.0, error=f"Ray worker lost: {_one_line(error)}")

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns_ray:
            self._ray.shutdown()


