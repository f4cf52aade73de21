"""The cache directory for derived data (tokenized bundled corpus, a retrained bundled tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def cache_dir(override: Optional[Union[str, Path]] = None) -> Path:
    """``override``, else ``$MEGATRON_SEED_CACHE``, else ``~/.cache/megatron_seed``; created if missing."""
    path = Path(override or os.environ.get("MEGATRON_SEED_CACHE") or Path.home() / ".cache" / "megatron_seed")
    path.mkdir(parents=True, exist_ok=True)
    return path
