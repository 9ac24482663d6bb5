"""Simulators: the synthetic head phantom and the Monte Carlo spin random walk,
and the two-site study generator for harmonization.

Research and test tools that make data with a known ground truth (the demo
cohort, tests, benchmarks, training data); no processing step calls them.
"""
