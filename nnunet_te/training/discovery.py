"""Fallback for trainer discovery: ``python -m nnunet_te.training.discovery`` prints the export line.

``pip install`` puts a ``.pth`` file into site-packages that sets ``nnUNet_extTrainer`` at every
interpreter start (see ``trainers/__init__.py``). Where that cannot work (an interpreter started
with ``-S``, a copied environment, a system that ignores ``.pth`` files), evaluate the printed
line in the shell: ``eval "$(python -m nnunet_te.training.discovery)"``.
"""

from __future__ import annotations

import os
import shlex

import nnunet_te_trainers


def export_line(environ=os.environ) -> str:
    """``export nnUNet_extTrainer=...``: the current value with our trainer folder appended."""
    value = nnunet_te_trainers.with_folder(environ.get(nnunet_te_trainers.ENV_VARIABLE))
    return f"export {nnunet_te_trainers.ENV_VARIABLE}={shlex.quote(value)}"


if __name__ == "__main__":
    print(export_line())
