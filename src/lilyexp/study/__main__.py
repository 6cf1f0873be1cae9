"""``python -m lilyexp.study <name> [overrides...]``: run a study to its verdict, then write its report.

Per task (in the study's order): the tune cells (every grid point at the tune seeds), the selection (written to
``<out>/<name>.selection.json``), then the confirm cells at the chosen points; the report is rewritten after each
task, so a study cut short still shows what it has. Finished cells are kept: the same command continues an
interrupted study. Overrides after the name go to every cell (``paths.results_dir=...``, ``debug=smoke``).

``--report`` only analyses the records that exist; ``--commands`` prints the runner command of every cell that
has not ended, ``--sweeps`` the same as one Hydra multirun per task, method and stage (to run them elsewhere:
another launcher, SLURM), then exits; the confirm sweeps appear once the tune cells have ended.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lilyexp.errors import ConfigError, RunInterrupted
from lilyexp.streams import survive_lost_readers
from lilyexp.study.analyse import analyse, chosen_points, planned_total, select
from lilyexp.study.plan import Cell, command, confirm_cells, grid_points, sweep_command, task_order, tune_cells
from lilyexp.study.render import write_report
from lilyexp.study.run_cells import ENDED, CellIndex, Progress, run_cell
from lilyexp.study.settings import StudySettings, load_study

log = logging.getLogger("lilyexp.study")
def remaining_by_task(study: StudySettings, index: CellIndex, progress: Progress) -> dict[str, int]:
    per_task = {t: len(tune_cells(study, t)) + len(study.methods) * len(study.confirm_seeds) for t in study.tasks}
    done: dict[str, int] = {}
    for task in per_task:
        cells = tune_cells(study, task) + confirm_cells(study, task, chosen_points(select(study, task, index)))
        done[task] = sum(index.state(c).status in ENDED for c in cells)
    return {t: max(0, per_task[t] - done[t]) for t in per_task}


def run_stage(cells: list[Cell], study: StudySettings, index: CellIndex, progress: Progress) -> None:
    for cell in cells:
        state = index.state(cell)
        if state.status not in ENDED:
            log.info(progress.line(cell, remaining_by_task(study, index, progress)))
            run_cell(index, cell)
            state = index.state(cell)
        if state.status in ENDED:
            progress.count(cell, state)


def run_study(study: StudySettings, index: CellIndex, out: Path) -> dict:
    progress = Progress(planned_total(study))
    for task in task_order(study):
        run_stage(tune_cells(study, task), study, index, progress)
        chosen = chosen_points(select(study, task, index))
        run_stage(confirm_cells(study, task, chosen), study, index, progress)
        report(study, index, out)
    return report(study, index, out)


def report(study: StudySettings, index: CellIndex, out: Path) -> dict:
    result = analyse(study, index)
    paths = write_report(study, result, index, out)
    log.info("study report: %s", ", ".join(map(str, paths)))
    return result


def pending_commands(study: StudySettings, index: CellIndex) -> list[str]:
    lines = []
    for task in task_order(study):
        cells = tune_cells(study, task) + confirm_cells(study, task, chosen_points(select(study, task, index)))
        lines += [command(c, study, index.extra) for c in cells if index.state(c).status not in ENDED]
    return lines


def pending_sweeps(study: StudySettings, index: CellIndex) -> list[str]:
    """One multirun per task, method and stage that still has cells to run (confirm only once selected)."""
    lines = []
    for task in task_order(study):
        chosen = chosen_points(select(study, task, index))
        for method in study.methods:
            tune = [c for c in tune_cells(study, task) if c.method == method]
            if any(index.state(c).status not in ENDED for c in tune):
                lines.append(sweep_command(study, task, method, grid_points(study, method), study.tune_seeds,
                                           index.extra))
            confirm = [c for c in confirm_cells(study, task, chosen) if c.method == method]
            if any(index.state(c).status not in ENDED for c in confirm):
                lines.append(sweep_command(study, task, method, [chosen[method]], study.confirm_seeds, index.extra))
    return lines


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lilyexp.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a study in conf/study (e.g. glue_minilm) or a yaml path")
    parser.add_argument("overrides", nargs="*", help="runner overrides for every cell")
    parser.add_argument("--out", default="results/studies", help="where the report goes")
    parser.add_argument("--report", action="store_true", help="analyse the existing records only")
    parser.add_argument("--commands", action="store_true", help="print the commands of the cells not yet ended")
    parser.add_argument("--sweeps", action="store_true", help="print them as one Hydra multirun per task, method "
                        "and stage (append hydra/launcher=submitit_slurm for SLURM); rerun after the tune sweeps "
                        "for the confirm ones")
    return parser.parse_intermixed_args(argv)  # options may stand among the runner overrides


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        study = load_study(args.name)
        index = CellIndex(study, tuple(args.overrides))
        if args.commands or args.sweeps:
            print("\n".join(pending_sweeps(study, index) if args.sweeps else pending_commands(study, index)))
            return 0
        if args.report:
            report(study, index, Path(args.out))
        else:
            run_study(study, index, Path(args.out))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"study interrupted ({exc.signal_name}); the same command continues it.", file=sys.stderr)
        return 130 if exc.signal_name == "SIGINT" else 143
    return 0


def cli() -> None:
    """``python -m lilyexp.study`` and the ``lilyexp-study`` command."""
    survive_lost_readers()  # a study runs for hours: a dropped session must not fail its cell
    sys.exit(main())


if __name__ == "__main__":
    cli()
