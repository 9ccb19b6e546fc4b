"""Test set-up shared by every test file.

Triton kernels run on CPU tensors through Triton's interpreter, which must be switched on before triton is
imported anywhere; on a machine with a GPU the kernels run natively and the CUDA tests run too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# where backend="triton" can run: CPU tensors through the interpreter (no GPU), CUDA tensors natively (a GPU and no
# interpreter); tests holding CPU tensors move them there for the triton backend and bring the results back
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads are pure overhead and spin badly when the CPU is busy
    (several times slower). Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
