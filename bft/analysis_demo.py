"""Deprecated alias: the refusal SFT lives in :mod:`bft.pipelines.refusal_sft` (its command in
:mod:`bft.commands.refusal_sft`); kept for one release, and ``python -m bft.analysis_demo`` still runs it."""

import sys
import warnings

from bft.pipelines.refusal_sft import REFUSALS, _batch, refusal_finetune  # noqa: F401

if __name__ == "__main__":
    from bft.commands.refusal_sft import main

    sys.exit(main())
else:
    warnings.warn("bft.analysis_demo is deprecated: import bft.pipelines.refusal_sft", DeprecationWarning,
                  stacklevel=2)  # fmt: skip
