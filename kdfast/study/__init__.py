"""``kdfast study``: the distillation design study (layer mapping x losses x weights x seeds) as one
command. See :mod:`kdfast.study.grid` (the grid file), :mod:`kdfast.study.runner` (runs, resume,
workers) and :mod:`kdfast.study.report` (table, heatmap, best config)."""
from kdfast.study.grid import GridError, StudyGrid, load_grid, make_grid
from kdfast.study.report import write_report
from kdfast.study.runner import read_runs, run_study

__all__ = ["GridError", "StudyGrid", "load_grid", "make_grid", "read_runs", "run_study", "write_report"]
