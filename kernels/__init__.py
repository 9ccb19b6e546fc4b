"""Triton kernels of bft, imported as ``bft.kernels`` (this folder is mapped in pyproject.toml).

Kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).

This folder must never act as a top-level ``kernels`` module: transformers imports the Hugging Face package of that
name, and ``python -m``/``python -c``/``python script.py`` put the checkout's root (or a script's folder) first on
``sys.path``, where this folder would be found before the installed distribution. So when this file is executed
under any name but ``bft.kernels``, it loads the same-named module from the rest of ``sys.path`` (the real one)
and puts that in ``sys.modules``, which is what the ``import`` statement returns; with none installed, the import
fails as if this folder did not exist. Only the standard library is used here, so the guard costs nothing.
"""

if __name__ != "bft.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.realpath(__file__))
    _rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.dirname(_here)]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _rest)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {_here} is bft.kernels)", name=__name__)
    # importlib removes the sys.modules entry again if this raises.
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[__name__])
