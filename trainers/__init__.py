"""The folder nnU-Net scans for our trainers, installed as the package ``nnunet_te_trainers``.

nnU-Net 2.8 looks for ``-tr NAME`` in its own trainer folder, then in every folder listed in the
environment variable ``nnUNet_extTrainer`` (``os.pathsep``-separated), importing each module
there as a top-level module. This folder holds one such module,
``nnunet_te_trainer_classes.py``, which only re-exports the classes of
:mod:`nnunet_te.training.trainers`.

The ``nnunet_te_trainers.pth`` file that ``pip install`` puts into site-packages calls
:func:`register` at every interpreter start, so ``nnUNetv2_train ... -tr RiskWeightedTrainer``
works in a fresh shell. This module must therefore stay cheap to import: ``os`` only, no torch.
"""

import os

#: The environment variable nnU-Net reads for external trainer folders.
ENV_VARIABLE = "nnUNet_extTrainer"

#: This folder, the one nnU-Net must scan.
FOLDER = os.path.dirname(os.path.abspath(__file__))


def with_folder(value, folder=FOLDER):
    """``value`` (a ``nnUNet_extTrainer`` setting, possibly None or empty) with ``folder``
    appended, or unchanged when ``folder`` is already listed: a user's own entries keep their
    order and priority."""
    entries = [entry for entry in (value or "").split(os.pathsep) if entry]
    if any(os.path.abspath(entry) == folder for entry in entries):
        return value
    return os.pathsep.join(entries + [folder])


def register(environ=os.environ):
    """Append :data:`FOLDER` to ``environ['nnUNet_extTrainer']`` unless it is already there."""
    environ[ENV_VARIABLE] = with_folder(environ.get(ENV_VARIABLE))
