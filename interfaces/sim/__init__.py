"""Simulators: the synthetic head phantom and the Monte Carlo spin random walk.

Research and test tools that make data with a known ground truth; nothing in
the processing path imports them.
"""
