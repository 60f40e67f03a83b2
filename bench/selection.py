"""One per-category selection, exhaustive and exact, side by side with the TPE path it replaces.

    python -m bench.selection                      # 30 milestones x 8 n x 21 λ on 200 maps of 256²
    python -m bench.selection --maps 40 --size 128 --milestones 6    # a quick look

Both runs read the same synthetic map cache (smooth normal maps, anomalous images with a blob whose strength
changes with the milestone) and write their study to a fresh SQLite storage, as `tfsearch run` does:

- exhaustive: `run_study` with `sampler: exhaustive`, every milestone x n x λ, image AUROC exact;
- TPE, as before this change: the selection code of commit 41ba2c5 (64 TPE trials over milestone, λ in
  [0.5, 1] and n; each candidate filters through `MapFuser`'s cache of 4 milestones x 3 kernel sizes and
  computes all five metrics), loaded from git.

It prints the wall time, candidates per second and the best image AUROC of each, where the exhaustive path
spent its time (reducing the maps to their hull candidates, `CandidateSet.prepare_maxima`, in one worker
process per CPU, each a milestone at a time, or with `--one-process` in this process, threads over each
milestone's images; the storage writes), and the load average at the start and at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import optuna
from scipy import ndimage

import tfsearch.run.selection.candidates
from tfsearch.maps.cache import MapSet, write_map_set
from tfsearch.maps.metrics import usable_cpus
from tfsearch.run.selection.candidates import CandidateSet, Config, StudyPlan, run_study
from tfsearch.run.space import parse_space

BEFORE = "41ba2c5"
KERNELS = [1, 3, 5, 7, 9, 11, 15, 21]


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


def load_before() -> types.ModuleType:
    """`tfsearch.run.selection.candidates` as it was at `BEFORE`, over `tfsearch.maps.metrics` of the same commit."""
    modules = {}
    for name in ("metrics", "selection"):
        source = subprocess.run(
            ["git", "show", f"{BEFORE}:tfsearch/{name}.py"], capture_output=True, text=True, check=True
        ).stdout
        source = source.replace("from tfsearch.maps.metrics import", "from tfsearch_before_metrics import")
        spec = importlib.util.spec_from_loader(f"tfsearch_before_{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        exec(compile(source, f"{BEFORE}:tfsearch/{name}.py", "exec"), module.__dict__)
        modules[name] = module
    return modules["selection"]


def storage(folder: Path, name: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{folder / name}.db")


def timing(module: types.ModuleType, name: str) -> list[float]:
    """Seconds spent in `module.name` (a function), accumulated while the bench runs."""
    spent = [0.0]
    original = getattr(module, name)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    setattr(module, name, timed)
    return spent


def best(study: optuna.Study) -> float:
    return max(t.value for t in study.trials if t.value is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--milestones", type=int, default=30)
    parser.add_argument("--lam-points", type=int, default=21)
    parser.add_argument("--tpe-trials", type=int, default=64)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="reduce the milestones in this process (threads over images)",
    )
    args = parser.parse_args()
    if args.one_process:
        tfsearch.run.selection.candidates.WORKER_MIN_PIXELS = math.inf
    load_at_start = os.getloadavg()
    params = {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"choices": KERNELS}}
    exhaustive = parse_space(
        {
            "name": "x",
            "selection": {"sampler": "exhaustive", "lam_points": args.lam_points},
            "params": params,
        },
        "bench",
    )
    tpe = parse_space(
        {"name": "t", "selection": {"sampler": "tpe", "trials": args.tpe_trials}, "params": params}, "bench"
    )
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-selection-") as folder:
        root = Path(folder)
        dirs = write_cache(root / "maps", args.maps, args.size, args.milestones)
        checkpoints = sorted(dirs)
        default = Config("default", checkpoints[-1][1], 0.95, 7)

        # both storages opened before the clocks start: the first pays for importing SQLAlchemy and alembic
        storages = storage(root, "exhaustive"), storage(root, "tpe")
        writes = timing(tfsearch.run.selection.candidates, "add_finished_trials")  # the storage writes
        # box filters and hull candidates: in worker processes, a milestone each, or per milestone in-process
        maxima = timing(CandidateSet, "prepare_maxima")
        in_process = timing(tfsearch.run.selection.candidates, "image_maxima")
        started = time.perf_counter()
        plan = StudyPlan("x/c", exhaustive, {"c": CandidateSet(dirs, tuple(KERNELS))}, checkpoints, default)
        study = run_study(storages[0], plan)
        exhaustive_s = time.perf_counter() - started
        started = time.perf_counter()
        exhaustive_n, exhaustive_best = len(study.trials), best(study)
        read_s = time.perf_counter() - started

        before = load_before()
        started = time.perf_counter()
        plan = before.StudyPlan("t/c", tpe, {"c": before.CandidateSet(dirs)}, checkpoints, default)
        study = before.run_study(storages[1], plan)
        tpe_s = time.perf_counter() - started
        tpe_n, tpe_best = len(study.trials), best(study)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores;", end=" ")
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}")
    print(f"{args.maps} maps of {args.size}², {args.milestones} milestones, n {KERNELS}")
    rate_x, rate_t = exhaustive_n / exhaustive_s, tpe_n / tpe_s
    print(f"exhaustive: {exhaustive_n} candidates in {exhaustive_s:.1f} s = {rate_x:.1f}/s, best", end=" ")
    where = "one process" if args.one_process else f"{min(usable_cpus(), args.milestones)} worker processes"
    print(
        f"{exhaustive_best:.4f}; of which filtering and hull candidates {maxima[0] + in_process[0]:.1f} s",
        end=" ",
    )
    print(f"({where}),", end=" ")
    print(f"writing the trials to SQLite {writes[0]:.1f} s; reading them back afterwards {read_s:.1f} s")
    print(f"TPE ({BEFORE}): {tpe_n} candidates in {tpe_s:.1f} s = {rate_t:.2f}/s, best {tpe_best:.4f}")
    print(f"candidates per second: {rate_x / rate_t:.0f}x")


if __name__ == "__main__":
    main()
