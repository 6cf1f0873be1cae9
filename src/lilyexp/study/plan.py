"""The cells of a study: a grid point of a method on a task at a seed, as the runner's overrides.

Two stages: ``tune`` (every grid point at the tune seeds) and ``confirm`` (the selected grid point at the confirm
seeds). A cell is identified by the runner itself (``lilyexp.settings.cell_identity``) within the study's record
group, so the study finds the records its cells wrote however they were run (the study, --commands, --sweeps).
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass

from lilyexp.study.settings import StudySettings


@dataclass(frozen=True)
class Cell:
    stage: str
    task: str
    method: str
    point: tuple[tuple[str, str], ...]  # (override key, value) per grid dimension
    seed: int

    def overrides(self, study: StudySettings, extra: tuple[str, ...] = ()) -> list[str]:
        method = study.methods[self.method]
        return [*study.base, *study.tasks[self.task].overrides, *method.overrides,
                *method.per_task.get(self.task, []), *(f"{k}={v}" for k, v in self.point),
                f"seed={self.seed}", f"group={study.group}", *extra]

    @property
    def label(self) -> str:
        point = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.point)
        return f"{self.stage} {self.task} {self.method} {point} seed {self.seed}"


def grid_points(study: StudySettings, method: str) -> list[tuple[tuple[str, str], ...]]:
    grid = study.methods[method].grid
    keys = list(grid)
    return [tuple(zip(keys, map(str, values))) for values in itertools.product(*(grid[k] for k in keys))]


def task_order(study: StudySettings) -> list[str]:
    return list(study.order or study.tasks)


def tune_cells(study: StudySettings, task: str) -> list[Cell]:
    """Every grid point at the tune seeds; a method with a single grid point has nothing to tune."""
    return [Cell("tune", task, method, point, seed) for method in study.methods if len(grid_points(study, method)) > 1
            for point in grid_points(study, method) for seed in study.tune_seeds]


def confirm_cells(study: StudySettings, task: str, selected: dict[str, tuple]) -> list[Cell]:
    """The confirm cells of the methods whose grid point is selected (``selected``: method -> point), seed by seed:
    a study stopped part-way has every method at its first seeds, i.e. complete pairs, not one method's seeds."""
    return [Cell("confirm", task, method, selected[method], seed) for seed in study.confirm_seeds
            for method in study.methods if method in selected]


def command(cell: Cell, study: StudySettings, extra: tuple[str, ...] = ()) -> str:
    return "python -m lilyexp.run " + " ".join(shlex.quote(o) for o in cell.overrides(study, extra))


def sweep_command(study: StudySettings, task: str, method: str, points: list[tuple], seeds: list[int],
                  extra: tuple[str, ...] = ()) -> str:
    """One Hydra multirun over ``points`` x ``seeds`` of a method on a task (any launcher: append
    ``hydra/launcher=submitit_slurm`` for SLURM). Grid dimensions become comma-separated sweeps."""
    keys = [k for k, _ in points[0]]
    swept = [f"{k}={','.join(dict.fromkeys(dict(p)[k] for p in points))}" for k in keys]
    probe = Cell("tune", task, method, (), seeds[0])
    fixed = [o for o in probe.overrides(study, extra) if not o.startswith(("seed=", *(f"{k}=" for k in keys)))]
    return "python -m lilyexp.run -m " + " ".join(shlex.quote(o) for o in
                                                   [*fixed, *swept, f"seed={','.join(map(str, seeds))}"])
