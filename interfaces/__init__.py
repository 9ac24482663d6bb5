"""dmriflow.interfaces: what each processing step computes.

One module per step. Numerics are plain functions on arrays; each module's
Pydra task definitions (the file-reading/writing side) sit at its end.
"""

__version__ = "0.1.0"
