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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved to disk (seed 0): the base model of the toy-size pipelines."""
    from bft.hf.testing import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-base")
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
