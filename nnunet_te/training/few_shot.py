"""k-shot subsets of a fold's training cases (issue 3, item 6)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def few_shot_cases(train_cases: Sequence[str], k: int, seed: int) -> list[str]:
    """``k`` of ``train_cases`` drawn without replacement with ``seed``, in sorted order.

    The draw depends only on the sorted case list, ``k`` and ``seed``, so it is the same on
    every machine and for every call (nnU-Net calls ``do_split`` more than once per run).
    Raises ValueError when the fold has fewer than ``k`` training cases or ``k < 1``.
    """
    cases = sorted(train_cases)
    if not 1 <= k <= len(cases):
        raise ValueError(f"cannot take k={k} training cases from a fold with {len(cases)}")
    chosen = np.random.default_rng(seed).choice(len(cases), size=k, replace=False)
    return sorted(cases[i] for i in chosen)
