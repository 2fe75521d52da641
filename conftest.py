"""Repository-wide pytest setup: the notebooks collected by nbmake run in smoke mode.

Their kernels inherit this process's environment, so ``CXR_SMOKE=1`` makes ``cxr.notebook.settings``
use a tiny synthetic dataset, random weights, 32 px images and one CPU epoch in a temporary folder.
"""

import os

os.environ.setdefault("CXR_SMOKE", "1")
# One OpenMP thread in every process the tests start (notebook kernels, the GPU check's smoke run, torchrun,
# CLI subprocesses), as tests/conftest.py sets for the test processes: pytest-xdist already runs one worker
# per core, and two threads each on tiny models only contend for the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
