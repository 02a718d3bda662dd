"""Experiments that join the three packages: minibatch OT-CFM (``ot_cfm``) judged against the exact
field (``proximal``). The top layer: nothing in ``ot_cfm``, ``proximal`` or ``manifold_tests`` imports it.

``batch_size``: how minibatch OT-CFM approaches population OT-CFM as the batch grows
(``ot-cfm experiment batch-size``, ``examples/batch_size_convergence.py``); a subpackage with one module per
part: the cells, the targets, the coupling and trained measurements, the cached run, the slopes, the report and
the command line.
"""
