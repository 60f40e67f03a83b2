"""What selecting on SegF1 costs, with and without its threshold's k searched, beside image AUROC.

    python -m bench.seg_threshold                       # 6 milestones x 3 n x 11 λ on 40 maps of 128²
    python -m bench.seg_threshold --maps 200 --size 256 --repeats 3

Every study reads the same synthetic map cache as `bench.selection` through a fresh `CategoryMaps` and
writes to a fresh SQLite storage, as `tfsearch run` does. Four exhaustive studies over the same milestones,
λ and n, differing in `selection.metric` and `params.seg_sigmas`:

- image AUROC: each candidate's exact image AUROC from its (milestone, n)'s hull candidates;
- SegF1, k = 3: each candidate fuses its maps and binarises every pixel at mean + 3 std of the normal
  images' pixels (these maps have no validation maps beside them: their own normal images set it);
- SegF1, k searched: the same with `seg_sigmas: {grid: K}` (`--ks`), so each (milestone, λ, n) is scored at
  every k, its fused maps reused;
- AU-PRO to 0.05, k = 3: each candidate through every metric (one sort of all pixels), the cost of
  selecting on any pixel metric other than SegF1.

It prints per study the candidates, the wall time (min / median / max over `--repeats`), candidates per second
and seconds per candidate and megapixel, the figure `tfsearch.run.cost` prices pixel-metric studies with; the
CPU and the load average at the start and at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from bench.selection import add_cache_arguments, load, spread, write_cache
from tfsearch.run.selection.candidates import Candidate, CategoryMaps
from tfsearch.run.selection.study import StudySpec, run_study
from tfsearch.run.space import parse_space
from tfsearch.transfusion.calibration import cpu_model

KERNELS = (1, 3, 5)


def spaces(lam_points: int, ks: list[float]) -> dict[str, object]:
    """The four studies' spaces: the same milestones, λ and n."""
    params = {"epoch": "milestones", "lam": {"low": 0.5, "high": 1.0}, "kernel": {"grid": list(KERNELS)}}
    studies = {
        "image AUROC": ("image_auroc", {}),
        "SegF1, k = 3": ("seg_f1", {}),
        f"SegF1, k in {ks}": ("seg_f1", {"seg_sigmas": {"grid": ks}}),
        "AU-PRO to 0.05, k = 3": ("aupro_05", {}),
    }
    return {
        name: parse_space(
            {
                "name": f"s{index}",
                "selection": {"metric": metric, "sampler": "exhaustive", "lam_points": lam_points},
                "params": {**params, **extra},
            },
            "bench",
        )
        for index, (name, (metric, extra)) in enumerate(studies.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cache_arguments(parser, maps=40, size=128, milestones=6, lam_points=11)
    parser.add_argument("--ks", default="1,2,3,4,5", help="k values of the searched study, comma-separated")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    ks = [float(k) for k in args.ks.split(",")]
    load_at_start = load()
    study_spaces = spaces(args.lam_points, ks)
    walls: dict[str, list[float]] = {name: [] for name in study_spaces}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tfsearch-bench-seg-threshold-") as folder:
        root = Path(folder)
        dirs = write_cache(root / "maps", args.maps, args.size, args.milestones)
        checkpoints = sorted(dirs)
        default = Candidate("default", checkpoints[-1][1], 0.95, 3)
        storages = {
            (name, repeat): optuna.storages.RDBStorage(f"sqlite:///{root / f'study-{index}-{repeat}.db'}")
            for repeat in range(args.repeats)
            for index, name in enumerate(study_spaces)
        }
        for repeat in range(args.repeats):
            for name, space in study_spaces.items():
                started = time.perf_counter()
                maps = {"c": CategoryMaps(dirs, KERNELS)}
                study = run_study(
                    storages[name, repeat], StudySpec(f"{name}/c", space, maps, checkpoints, default)
                )
                walls[name].append(time.perf_counter() - started)
                counts[name] = len(study.trials)

    print(f"machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores;", end=" ")
    print(f"load average at start {load_at_start}, at end {load()}")
    megapixels = args.maps * args.size * args.size / 1e6
    print(
        f"{args.maps} maps of {args.size}² ({megapixels:.2f} megapixels), {args.milestones} milestones,"
        f" n {list(KERNELS)}, {args.lam_points} λ; {args.repeats} run(s) of each study"
    )
    base = None
    for name, wall in walls.items():
        median = statistics.median(wall)
        per = median / counts[name]
        base = base or per
        print(
            f"{name}: {counts[name]} candidates in {spread(wall)} = {counts[name] / median:.1f}/s;"
            f" {per * 1e3:.3f} ms per candidate ({per / megapixels * 1e3:.3f} ms per megapixel),"
            f" {per / base:.1f}x image AUROC's"
        )


if __name__ == "__main__":
    main()
