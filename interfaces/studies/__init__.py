"""Studies: scripted analyses on simulated or real cohorts (numerics only).

Each study takes its data folders as arguments; none is part of a pipeline run.
"""
