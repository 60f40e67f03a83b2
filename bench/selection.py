"""One per-category selection study, exhaustive and exact, side by side with TPE studies on the same maps.

    python -m bench.selection                      # 30 milestones x 8 n x 21 λ on 200 maps of 256²
    python -m bench.selection --maps 40 --size 128 --milestones 6    # a quick look
    python -m bench.selection --repeats 3          # each study three times: min / median / max
    python -m bench.selection --lam-points 51 --kernels 1,3,5,7,9,11,13,15 --exhaustive-only
                                                   # the built-in per_class space's grid, 12,240 candidates

Every study reads the same synthetic map cache (smooth normal maps, anomalous images with a blob whose
strength changes with the milestone) through a fresh `CategoryMaps`, and writes to a fresh SQLite storage,
as `tfsearch run` does (every storage is opened before the clocks start). Three studies, all through the
current `run_study`, differing only in their space's `selection` block:

- exhaustive: `sampler: exhaustive`, every milestone x n x λ (`--lam-points`, `--kernels`), each candidate's
  image AUROC exact from the hull candidates of its (milestone, n) (`ImageMaxima`);
- tpe: `sampler: tpe`, `--tpe-trials` candidates (64, as the built-in `global` space draws) drawn over
  milestone, λ in [0.5, 1] and n, scored the same exact way;
- tpe, all metrics: the same TPE study with `all_metrics: true`: each candidate through `MapFuser` (filtered
  maps cached for 4 milestones x 3 n) and all five metrics. This is how every candidate was scored before
  selection scored image AUROC alone, and the baseline earlier figures of this bench compared against.

It prints, per study, the wall time, candidates per second and the best image AUROC; for the exhaustive
study where its time went (reducing the maps to their hull candidates, `CategoryMaps.prepare_maxima`, in
one worker process per CPU, each a milestone at a time, or with `--one-process` in this process, threads
over each milestone's images; the storage writes; outside its wall time, reading the trials back as the
dashboard does, and what the tables of `tfsearch run` then read, each through a freshly opened storage as
the run opens one: `trials.csv`'s rows (`candidate_rows`), `importance.csv`'s shares (`candidates_frame`,
`grid_importance`) and the chosen configuration (`best_candidate`)); the ratio of candidates per second;
the CPU and the load average at the start and at the end. `--exhaustive-only` leaves the TPE studies
out. With `--repeats N` each study runs N times (in turn: exhaustive, tpe, tpe with all metrics, then
again) and each time figure is given as min / median / max.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from scipy import ndimage

import tfsearch.run.selection.candidates
import tfsearch.run.selection.study
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.fusion import usable_cpus
from tfsearch.run.results import candidate_rows
from tfsearch.run.selection.candidates import Candidate, CategoryMaps
from tfsearch.run.selection.log import candidates_frame, grid_importance
from tfsearch.run.selection.study import StudySpec, best_candidate, run_study
from tfsearch.run.space import Space, parse_space
from tfsearch.transfusion.calibration import cpu_model

KERNELS = [1, 3, 5, 7, 9, 11, 15, 21]
STUDIES = ("exhaustive", "tpe", "tpe, all metrics")


def write_cache(root: Path, maps: int, size: int, milestones: int, seed: int = 0) -> dict:
    """Map sets of one category at each milestone: smooth noise, and a blob on the anomalous half."""
    rng = np.random.default_rng(seed)
    base = ndimage.uniform_filter(rng.random((2, maps, size, size), dtype=np.float32), (1, 1, 5, 5)) * 0.3
    masks = np.zeros((maps, size, size), dtype=bool)
    for i in range(1, maps, 2):
        top, left = rng.integers(0, size - size // 8, 2)
        masks[i, top : top + size // 10, left : left + size // 12] = True
    dirs = {}
    for index in range(milestones):
        epoch = 50 * (index + 1)
        strength = 0.05 + 0.25 * np.sin(np.pi * (index + 1) / (milestones + 1))  # best in the middle
        jitter = rng.random((2, maps, 1, 1), dtype=np.float32) * 0.1
        maps_set = MapSet(
            m_disc=base[0] + jitter[0] + strength * masks,
            m_recon=base[1] + jitter[1] + 0.5 * strength * masks,
            masks=masks,
            labels=masks.any((1, 2)).astype(np.int8),
            image_ids=[f"image-{i}" for i in range(maps)],
            meta={"dataset": "bench", "category": "c", "epoch": epoch, "split": "test", "image_size": size,
                  "data_root": None, "mask_paths": [None] * maps},
        )  # fmt: skip
        write_map_set(root / f"epoch-{epoch:04d}", maps_set)
        dirs["default", epoch] = root / f"epoch-{epoch:04d}"
    return dirs


def spaces(lam_points: int, tpe_trials: int, kernels: list[int]) -> dict[str, Space]:
    """The three studies' spaces: the same parameters, three `selection` blocks."""
    params = {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": kernels}}
    selection = {
        "exhaustive": {"sampler": "exhaustive", "lam_points": lam_points},
        "tpe": {"sampler": "tpe", "trials": tpe_trials},
        "tpe, all metrics": {"sampler": "tpe", "trials": tpe_trials, "all_metrics": True},
    }
    return {
        name: parse_space({"name": f"s{index}", "selection": block, "params": params}, "bench")
        for index, (name, block) in enumerate(selection.items())
    }


class Timer:
    """Seconds spent in a function of a module or class, while the bench runs; `take` returns and resets."""

    def __init__(self, owner: types.ModuleType | type, name: str) -> None:
        self.spent = 0.0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - started

        setattr(owner, name, timed)

    def take(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent


@dataclass
class Runs:
    """What one kind of study measured, a value per repeat."""

    candidates: int = 0
    best: float = math.nan
    wall: list[float] = field(default_factory=list)
    maxima: list[float] = field(default_factory=list)  # filtering and hull candidates
    writes: list[float] = field(default_factory=list)  # bulk writes to SQLite
    read_back: list[float] = field(default_factory=list)
    rows: list[float] = field(default_factory=list)  # trials.csv's rows, from a fresh storage
    importance: list[float] = field(default_factory=list)  # importance.csv's shares, from a fresh storage
    chosen: list[float] = field(default_factory=list)  # the chosen configuration, from a fresh storage

    @property
    def rate(self) -> float:
        return self.candidates / statistics.median(self.wall)


def spread(values: list[float], digits: int = 1) -> str:
    """One value, or min / median / max of several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} s"
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{low:.{digits}f} / {mid:.{digits}f} / {high:.{digits}f} s"


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def best(study: optuna.Study) -> float:
    return max(t.value for t in study.trials if t.value is not None)


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure_tables(measured: Runs, url: str, name: str, default: Candidate) -> None:
    """What the run's tables read of a finished study, each through a storage opened afresh as they do."""

    def fresh() -> optuna.Study:
        return optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url))

    measured.rows.append(timed(lambda: candidate_rows(fresh(), "test")))
    measured.importance.append(timed(lambda: grid_importance(candidates_frame(fresh()))))
    measured.chosen.append(timed(lambda: best_candidate(fresh(), default)))


def add_cache_arguments(
    parser: argparse.ArgumentParser, *, maps: int, size: int, milestones: int, lam_points: int
) -> None:
    """The synthetic map cache's flags (`write_cache`), the λ values per study and `--repeats`."""
    parser.add_argument("--maps", type=int, default=maps)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--milestones", type=int, default=milestones)
    parser.add_argument("--lam-points", type=int, default=lam_points)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each study (min / median / max)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_arguments(parser, maps=200, size=256, milestones=30, lam_points=21)
    parser.add_argument("--kernels", default=",".join(map(str, KERNELS)), help="n values, comma-separated")
    parser.add_argument("--exhaustive-only", action="store_true", help="no TPE studies beside it")
    parser.add_argument("--tpe-trials", type=int, default=64)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="reduce the milestones in this process (threads over images)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    kernels = [int(k) for k in args.kernels.split(",")]
    studies = STUDIES[:1] if args.exhaustive_only else STUDIES
    if args.one_process:
        tfsearch.run.selection.candidates.WORKER_MIN_PIXELS = math.inf
    load_at_start = load()
    study_spaces = spaces(args.lam_points, args.tpe_trials, kernels)
    runs = {name: Runs() for name in studies}
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-selection-") as folder:
        root = Path(folder)
        dirs = write_cache(root / "maps", args.maps, args.size, args.milestones)
        checkpoints = sorted(dirs)
        default = Candidate("default", checkpoints[-1][1], 0.95, 7)

        # every storage opened before the clocks start: the first pays for importing SQLAlchemy and alembic
        urls = {
            (name, repeat): f"sqlite:///{root / f'study-{index}-{repeat}.db'}"
            for repeat in range(args.repeats)
            for index, name in enumerate(studies)
        }
        storages = {key: optuna.storages.RDBStorage(url) for key, url in urls.items()}
        writes = Timer(tfsearch.run.selection.study, "add_finished_trials")
        # box filters and hull candidates: in worker processes, a milestone each, or per milestone in-process
        maxima = Timer(CategoryMaps, "prepare_maxima")
        in_process = Timer(tfsearch.run.selection.candidates, "image_maxima")
        for repeat in range(args.repeats):
            for name in studies:
                for timer in (writes, maxima, in_process):
                    timer.take()
                measured = runs[name]
                started = time.perf_counter()
                maps = {"c": CategoryMaps(dirs, tuple(kernels))}
                plan = StudySpec(f"{name}/c", study_spaces[name], maps, checkpoints, default)
                study = run_study(storages[name, repeat], plan)
                measured.wall.append(time.perf_counter() - started)
                measured.maxima.append(maxima.take() + in_process.take())
                measured.writes.append(writes.take())
                started = time.perf_counter()
                measured.candidates, measured.best = len(study.trials), best(study)
                measured.read_back.append(time.perf_counter() - started)
                if name == "exhaustive":
                    measure_tables(measured, urls[name, repeat], f"{name}/c", default)

    print(f"machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores;", end=" ")
    print(f"load average at start {load_at_start}, at end {load()}")
    print(f"{args.maps} maps of {args.size}², {args.milestones} milestones, n {kernels}", end="")
    repeats = ", each time figure min / median / max" if args.repeats > 1 else ""
    print(f"; {args.repeats} run{'s' * (args.repeats > 1)} of each study{repeats}")
    workers = min(usable_cpus(), args.milestones)
    pixels = args.maps * args.size * args.size
    if args.one_process or workers < 2 or pixels < tfsearch.run.selection.candidates.WORKER_MIN_PIXELS:
        where = "in this process"
    else:
        where = f"{workers} worker processes"
    exhaustive = runs["exhaustive"]
    print(
        f"exhaustive: {exhaustive.candidates} candidates in {spread(exhaustive.wall)} = "
        f"{exhaustive.rate:.1f}/s, best {exhaustive.best:.4f}; of which filtering and hull candidates "
        f"{spread(exhaustive.maxima)} ({where}), writing the trials to SQLite {spread(exhaustive.writes)}; "
        f"reading them back afterwards {spread(exhaustive.read_back)}"
    )
    print(
        "tables of the exhaustive study, each from a fresh storage:"
        f" trials.csv rows {spread(exhaustive.rows)}, importance {spread(exhaustive.importance)},"
        f" chosen configuration {spread(exhaustive.chosen, 3)}"
    )
    for name in studies[1:]:
        measured = runs[name]
        detail = ""
        if name == "tpe":
            detail = f"; of which filtering and hull candidates {spread(measured.maxima)}"
        print(
            f"{name}: {measured.candidates} candidates in {spread(measured.wall)} = "
            f"{measured.rate:.2f}/s, best {measured.best:.4f}{detail}"
        )
    if len(studies) > 1:
        ratios = ", ".join(f"over {name} {exhaustive.rate / runs[name].rate:.1f}x" for name in studies[1:])
        print(f"candidates per second of the exhaustive study (medians): {ratios}")


if __name__ == "__main__":
    main()
