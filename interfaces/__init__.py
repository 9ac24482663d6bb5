"""dmriflow.interfaces: what each processing step computes.

One module per step. Numerics are plain functions on arrays; each module's
Pydra task definitions (the file-reading/writing side) sit at its end.

Importing the package pins BLAS to one thread process-wide
(:func:`parallel.pin_blas_threads`): results must not depend on the thread
count the machine gives, and parallelism comes from workers.
"""

from .parallel import pin_blas_threads

__version__ = "0.1.0"

pin_blas_threads()
