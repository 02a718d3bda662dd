"""Batch-size convergence of minibatch OT-CFM to the population OT-CFM (DESIGN.md section 1).

Minibatch OT-CFM pairs B source points x0 ~ N(0, I_d) with B target points x1 by exact OT.
Against the Brenier map T of the target (closed form, or fitted by ``fit_discrete_potential``)
each cell (target, coupler, B, seed) measures, over about ``n_eval`` points:

    coupling error    E |x1_B(x0) - T(x0)|^2 / E |x1 - x0|^2     (denominator: independent pairs)
    regression error  E |(x1 - x0) - u_t(x_t)|^2 / E |u_t(x_t)|^2,   x_t = (1 - t) x0 + t x1

with (x0, x1) the coupler's pairs and u_t the exact field ``potential.velocity``. B = inf is the
population coupling ``SemidiscreteCoupler(potential)``. For B = 1 and a Gaussian target N(m, S),
x1 and T(x0) are independent copies of N(m, S): the coupling error is 2 tr(S) / (|m|^2 + tr(S) + d).
Optionally a model is trained per (target, B, seed) with ``Trainer`` and scored by ``field_error``
and ``evaluate_samples``. Cells are cached as JSON files, so a killed run resumes where it stopped.

- ``cells``: ``Cell`` (one measurement, its cache key and its generator) and ``ExperimentConfig`` (the settings).
- ``targets``: ``TARGETS``, ``TRAINABLE``, ``Target`` and ``make_target``: closed-form and fitted potentials.
- ``coupling``: the coupling and regression-target errors of an exact, Sinkhorn or population cell.
- ``trained``: a model trained at batch size B, scored against the exact field and by its samples.
- ``run``: ``measure_cell`` and ``run_experiment``, the cells in order with a resumable cache.
- ``analysis``: ``fit_slopes``, log-log slopes of a metric against B per seed.
- ``report``: ``write_outputs``, the CSV, the markdown tables and the figures.
- ``cli``: ``main``, the command line (``ot-cfm experiment batch-size``).
"""

from ot_cfm_experiments.batch_size.analysis import fit_slopes
from ot_cfm_experiments.batch_size.cells import Cell, ExperimentConfig
from ot_cfm_experiments.batch_size.cli import build_parser as build_parser  # importable here, documented in cli
from ot_cfm_experiments.batch_size.cli import main
from ot_cfm_experiments.batch_size.report import write_outputs
from ot_cfm_experiments.batch_size.run import measure_cell, run_experiment
from ot_cfm_experiments.batch_size.targets import TARGETS, TRAINABLE, Target, make_target

__all__ = ["TARGETS", "TRAINABLE", "Target", "Cell", "ExperimentConfig", "make_target", "measure_cell",
           "run_experiment", "fit_slopes", "write_outputs", "main"]
