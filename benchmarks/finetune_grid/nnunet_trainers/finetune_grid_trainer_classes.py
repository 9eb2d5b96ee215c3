"""Re-exports the benchmark's ``*_bench`` trainers for nnU-Net's ``-tr`` lookup.

The benchmark lists this folder first in ``nnUNet_extTrainer`` for its own ``nnUNetv2_train``
processes (``benchmarks.finetune_grid.trainers.subprocess_environment``). nnU-Net imports this
file as a top-level module and drops it from ``sys.modules`` afterwards, so it holds nothing but
the import: the classes (and everything pickled into the augmentation workers) live in
:mod:`benchmarks.finetune_grid.trainers`.
"""

from benchmarks.finetune_grid.trainers import *  # noqa: F401,F403
