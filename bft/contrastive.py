"""Deprecated: :mod:`bft.decoding` holds contrastive decoding (Eq. 7); prompt I/O moved to :mod:`bft.hf`, the
command to :mod:`bft.cli.generate`. This alias keeps the old names for one release."""

import warnings

from bft.atomic import atomic_write_text  # noqa: F401
from bft.decoding.contrastive import *  # noqa: F401,F403
from bft.decoding.contrastive import __all__  # noqa: F401
from bft.hf.chat import render_prompts  # noqa: F401
from bft.hf.data import read_prompts  # noqa: F401
from bft.hf.data import response_prefixes as _prefills  # noqa: F401
from bft.hf.models import load_pair  # noqa: F401

warnings.warn("bft.contrastive is deprecated: import bft.decoding (and bft.hf for prompt I/O)", DeprecationWarning,
              stacklevel=2)  # fmt: skip
