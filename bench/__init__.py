"""Benchmarks: `python -m bench.NAME [--quick]` (kernel, step, train) and `python -m bench.run_all`.

Importing the package, which `python -m bench.NAME` does before torch is loaded, makes idle OpenMP
threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE) unless the caller chose a policy. On a
shared machine, spinning threads that wait for a core taken by another process turn every parallel
region into a scheduler time slice (a 64×64 matmul measured 15 ms instead of 40 µs), which would
measure the neighbours rather than the library. The thread count stays at torch's default.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
