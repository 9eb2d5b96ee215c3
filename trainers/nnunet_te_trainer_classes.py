"""Re-exports the nnunet_te trainers for nnU-Net's trainer lookup.

nnU-Net imports this file as a top-level module and drops it from ``sys.modules`` afterwards, so
it holds nothing but the import: the classes themselves (and everything pickled into the
augmentation workers) live in :mod:`nnunet_te.training.trainers`, whose ``__all__`` lists every
trainer name, including the generated few-shot and CPU variants.
"""

from nnunet_te.training.trainers import *  # noqa: F401,F403
