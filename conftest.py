"""Repository-wide pytest setup: the notebooks collected by nbmake run in smoke mode.

Their kernels inherit this process's environment, so ``CXR_SMOKE=1`` makes ``cxr.notebook.settings``
use a tiny synthetic dataset, random weights, 32 px images and one CPU epoch in a temporary folder.
"""

import os

os.environ.setdefault("CXR_SMOKE", "1")
