"""The Hub-kernels switch, apart from :mod:`bts.core.hf_compat` so that reading it does not import ``transformers``
(the ``env`` block of every ``metrics.json`` records it, and collecting that block must stay fast).

``transformers`` 5.2x loads kernels from the Hugging Face Hub by default when a model is loaded on a GPU
(``use_kernels``): that needs the ``kernels`` package, may download code at run time (an offline node cannot) and
changes the numerics. The project keeps them off unless ``BTS_HUB_KERNELS=1`` is set (docs/compatibility.md).
"""

from __future__ import annotations

import os

HUB_KERNELS_ENV = "BTS_HUB_KERNELS"
"""Set to 1 to let ``transformers`` load Hub kernels (off by default: deterministic and offline)."""


def hub_kernels_enabled() -> bool:
    """``BTS_HUB_KERNELS=1`` (or true/yes) lets ``transformers`` use Hub kernels; anything else keeps them off."""
    return os.environ.get(HUB_KERNELS_ENV, "").strip().lower() in ("1", "true", "yes")
