"""Run a grid of independent jobs (simulated federations) one by one, on a local process pool, or on Ray.

The experiment scripts run grids of simulations (topologies x sizes x rules x attacks). Each job is
a pure function of its arguments (every random draw comes from the config's seed), so where it runs
cannot change its result: `run_grid(fn, items, backend=...)` returns [fn(item) for item in items],
in item order, whichever backend computed them.

* "serial": in this process (the reference; what the scripts do without an option).
* "process": a local pool of `workers` processes (concurrent.futures, spawn start method, torch
  limited to `threads` threads per worker so the pool does not oversubscribe the cores).
* "ray": tasks on a Ray cluster (`address`: an existing cluster such as "ray://head:10001" or
  "auto"; None starts a local one), for sweeps that outgrow one machine. Ray is an optional extra
  (pip install ray); without it this backend raises ConfigError saying so, and "auto" falls back to
  the process pool.

`fn` and the items must be picklable (a module-level function, dataclass configs).
`add_arguments` / `run_grid_from_args` give the experiment scripts the same --backend, --workers
and --ray-address options.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from p2pfl.errors import ConfigError

BACKENDS = ("serial", "process", "ray", "auto")

T = TypeVar("T")
R = TypeVar("R")


def ray_available() -> bool:
    """Whether the optional Ray package can be imported here."""
    return importlib.util.find_spec("ray") is not None


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _limit_threads(threads: int) -> None:
    """Worker initializer: a few torch threads per worker (a pool of N workers x all cores each
    would only make them wait on each other)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _call_limited(fn: Callable[[T], R], item: T, threads: int) -> R:
    _limit_threads(threads)
    return fn(item)


def run_grid(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    backend: str = "serial",
    workers: int | None = None,
    threads: int = 1,
    address: str | None = None,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """[fn(item) for item in items] on `backend`, in item order; on_result(index, result) is called
    in this process as each job finishes (in completion order: for progress output)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown grid backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "ray" if ray_available() else "process"
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if not items:
        return []
    if backend == "serial":
        out = []
        for i, item in enumerate(items):
            result = fn(item)
            if on_result is not None:
                on_result(i, result)
            out.append(result)
        return out
    if backend == "process":
        return _run_pool(fn, items, workers or default_workers(), threads, on_result)
    return _run_ray(fn, items, workers, threads, address, on_result)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment scripts' grid options: --backend, --workers, --ray-address (run_grid_from_args
    reads them, with the script's --threads)."""
    parser.add_argument(
        "--backend",
        default="serial",
        choices=BACKENDS,
        help="where the grid runs (p2pfl.grid): here, a local process pool, or Ray (pip install ray); "
        "the results are the same",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="process-pool / local Ray workers (default: cores)"
    )
    parser.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: start a local one)"
    )


def run_grid_from_args(
    fn: Callable[[T], R],
    items: Sequence[T],
    args: argparse.Namespace,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """run_grid with the options add_arguments declared (and args.threads torch threads per job)."""
    return run_grid(
        fn,
        items,
        backend=args.backend,
        workers=args.workers,
        threads=args.threads,
        address=args.ray_address,
        on_result=on_result,
    )


def _run_pool(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int,
    threads: int,
    on_result: Callable[[int, R], None] | None,
) -> list[R]:
    results: dict[int, R] = {}
    context = multiprocessing.get_context("spawn")  # no forked torch / thread state in the workers
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=context,
        initializer=_limit_threads,
        initargs=(threads,),
    ) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_result is not None:
                on_result(i, results[i])
    return [results[i] for i in range(len(items))]


def _run_ray(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int | None,
    threads: int,
    address: str | None,
    on_result: Callable[[int, R], None] | None,
) -> list[R]:
    if not ray_available():
        raise ConfigError(
            "grid backend 'ray' needs Ray: pip install ray (or run the grid with the local process pool)"
        )
    ray: Any = importlib.import_module("ray")  # optional: not a dependency (no stubs needed)

    started_here = not ray.is_initialized()
    if started_here:
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            options["address"] = address
        else:  # a local cluster of this machine's cores
            options["num_cpus"] = workers or default_workers()
        ray.init(**options)
    try:
        remote: Any = ray.remote(num_cpus=1)(_call_limited)
        refs = [remote.remote(fn, item, threads) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, R] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                results[i] = ray.get(ref)
                if on_result is not None:
                    on_result(i, results[i])
        return [results[i] for i in range(len(items))]
    finally:
        if started_here:
            ray.shutdown()


def simulate(cfg: Any) -> Any:
    """p2pfl.sim.simulate(cfg) without the per-round callback: a picklable job for run_grid."""
    from p2pfl.sim import simulate as run

    return run(cfg)


def timed_run(cfg: Any, gap: bool = False) -> tuple[Any, float]:
    """(Simulation(cfg).run(gap=gap), its seconds): the experiment grids' job (the spectral gap
    only where the table shows it; functools.partial(timed_run, gap=True) pickles too)."""
    import time

    from p2pfl.sim import Simulation

    started = time.perf_counter()
    result = Simulation(cfg).run(gap=gap)
    return result, time.perf_counter() - started
