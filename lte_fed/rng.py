"""Seeds derived from keys, so that every random choice takes an explicit generator.

`derive_seed(seed, n)` gives head n's seed in both engines, whatever else has been drawn.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the integer keys (stable across runs and machines)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def torch_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# Key namespaces, so that e.g. head 3's init never shares a stream with head 3's data.
INIT, DATA, SPLIT, MODEL, AUGMENT = 1, 2, 3, 4, 5
SAMPLE = 6  # text generated at the end of a language-model run
