"""Measuring cells: one cell's metrics, and a list of cells run in order with a resumable on-disk cache.

Each computed cell is written at once, atomically, to ``cache_dir/<cell key>.json`` with the settings that
produced it (its spec: the cell, the ``ExperimentConfig`` fields it depends on, the target's note and fit, and
for trained cells the Trainer's ``DATA_STREAM``). A cached cell is read back when its spec is the same and
recomputed otherwise, so a killed run resumes where it stopped and a changed setting recomputes only what it
affects.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ot_cfm.training.batches import DATA_STREAM
from ot_cfm.utils.atomic import atomic_write
from ot_cfm_experiments.batch_size.cells import Cell, ExperimentConfig
from ot_cfm_experiments.batch_size.coupling import measure_coupling
from ot_cfm_experiments.batch_size.targets import Target, make_target
from ot_cfm_experiments.batch_size.trained import measure_trained

__all__ = ["measure_cell", "run_experiment"]


def measure_cell(cell: Cell, target: Target, config: ExperimentConfig = ExperimentConfig()) -> dict:
    """The metrics of one cell as a flat dict of numbers: ``measure_trained`` for a "trained" cell,
    ``measure_coupling`` otherwise."""
    if cell.coupler == "trained":
        return measure_trained(cell, target, config)
    return measure_coupling(cell, target, config)


def _cell_spec(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
    spec = {"cell": asdict(cell), "config": asdict(config), "target_note": target.note}
    if target.fit:  # identifies a fitted potential: a refit (another solver, another budget) gives other cells
        spec["target_fit"] = target.fit
    if cell.coupler == "trained":  # the training batches depend on how the Trainer draws them
        spec["data_stream"] = DATA_STREAM
        return json.loads(json.dumps(spec))
    for name in ("train_steps", "train_lr", "train_width", "train_eval_n"):
        del spec["config"][name]
    if cell.coupler != "sinkhorn":
        del spec["config"]["epsilon"], spec["config"]["sinkhorn_max_iters"]
    return json.loads(json.dumps(spec))


def run_experiment(cells: Sequence[Cell], config: ExperimentConfig, cache_dir: str | os.PathLike, *,
                   progress: bool = True, on_cell: Callable[[Cell, dict], None] | None = None) -> list[dict]:
    """Measure every cell (reading cached ones), in the given order; returns one row per cell.

    Each computed cell is written at once to ``cache_dir/<cell key>.json`` (atomically), with the
    settings that produced it; a cached cell whose settings differ is recomputed. ``on_cell(cell,
    row)`` is called after each cell (cached or not).
    """
    cache_dir = Path(cache_dir)
    targets: dict[str, Target] = {}
    rows = []
    bar = tqdm(cells, desc="batch-size cells", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        if cell.target not in targets:
            targets[cell.target] = make_target(cell.target, cache_dir=cache_dir, config=config)
        target = targets[cell.target]
        spec = _cell_spec(cell, target, config)
        path = cache_dir / f"{cell.key}.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        if stored is None or stored["spec"] != spec:
            start = time.perf_counter()
            metrics = measure_cell(cell, target, config)
            stored = {"spec": spec, "metrics": metrics, "seconds": time.perf_counter() - start}
            atomic_write(path, lambda f: json.dump(stored, f, indent=1))
        row = {**asdict(cell), "dim": target.dim, "seconds": stored["seconds"], **stored["metrics"]}
        rows.append(row)
        if on_cell is not None:
            on_cell(cell, row)
    bar.close()
    return rows
