"""Test set-up shared by every test file: the environment and fixtures (helpers the tests import: helpers.py).

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before triton is
imported anywhere; on a machine with a GPU the kernels run natively and the CUDA tests run too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads are pure overhead and spin badly when the CPU is busy
    (several times slower). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
