"""Experiments: model comparisons, training studies and their metrics.

They train and score the networks of :mod:`dmriflow.models` on simulated
cohorts; served inference never imports them.
"""
