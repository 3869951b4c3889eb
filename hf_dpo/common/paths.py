"""Where hf_dpo keeps what it caches between runs (precomputed reference log-probs, the fetched real model)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HF_DPO_CACHE"


def cache_root() -> Path:
    """``$HF_DPO_CACHE``, defaulting to ``~/.cache/hf_dpo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_dpo")
