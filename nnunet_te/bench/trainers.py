"""The benchmark's training schedule on top of the product's CPU trainers.

``<name>_bench`` for every ``<name>_cpu`` trainer of :mod:`nnunet_te.training.trainers`
(``nnUNetTrainer_k5s0_bench``, ``RiskWeightedTrainer_k10s1_bench``, ``nnUNetTrainer_bench``, ...):
the same class (few-shot split, risk weighting, a checkpoint per epoch, ``--c`` resumes) with the
schedule read from the environment instead of the smoke-run constants, and the final validation
on every validation case (the benchmark's test cases), not the first two, without test-time
mirroring:

==============================  =======================================
``nnUNet_te_bench_epochs``      epochs (required)
``nnUNet_te_bench_iterations``  training iterations per epoch (required)
``nnUNet_te_bench_val_iterations``  validation iterations per epoch (default 2)
``nnUNet_te_bench_threads``     torch CPU threads (default: nnU-Net's, every core)
==============================  =======================================

nnU-Net finds these names through a one-line shim module that :func:`trainer_folder` writes
(the benchmark puts that folder first in ``nnUNet_extTrainer`` for its own subprocesses).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunet_te.training import trainers as product

SCHEDULE_VARIABLES = ("nnUNet_te_bench_epochs", "nnUNet_te_bench_iterations", "nnUNet_te_bench_val_iterations")
THREADS_VARIABLE = "nnUNet_te_bench_threads"
SHIM_MODULE = "nnunet_te_bench_trainer_classes"


def read_schedule(environ=os.environ) -> tuple[int, int, int]:
    """(epochs, iterations per epoch, validation iterations per epoch) from the environment."""
    values = []
    for variable, default in zip(SCHEDULE_VARIABLES, (None, None, "2")):
        raw = environ.get(variable, default)
        if raw is None:
            raise RuntimeError(f"{variable} is not set: the *_bench trainers take their schedule from "
                               f"{', '.join(SCHEDULE_VARIABLES)} (nnunet-te bench sets them)")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"{variable} must be >= 1, got {value}")
        values.append(value)
    return tuple(values)


class _ProgressPlotAfterLastEpoch:
    """nnU-Net's logger (every call passed on) that draws ``progress.png`` only once all
    ``num_epochs`` are logged: nnU-Net redraws it after every epoch, about 1 s on this CPU, a
    fifth of a hippocampus epoch at the benchmark's schedule."""

    def __init__(self, logger, num_epochs: int):
        self._logger, self._num_epochs = logger, num_epochs

    def __getattr__(self, name):
        return getattr(self._logger, name)

    def plot_progress_png(self, output_folder: str) -> None:
        if len(self._logger.get_value("epoch_end_timestamps", step=None)) >= self._num_epochs:
            self._logger.plot_progress_png(output_folder)


class BenchSchedule:
    """Mixin over a product ``*_cpu`` trainer: schedule from :func:`read_schedule`, final
    validation on every validation case, not mirrored, progress plot after the last epoch."""

    num_final_validation_cases = None  # slice end: all cases

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = read_schedule()
        self.logger = _ProgressPlotAfterLastEpoch(self.logger, self.num_epochs)
        threads = os.environ.get(THREADS_VARIABLE)
        if threads:
            # nnUNetv2_train gives torch every core; fine-tunes run side by side take a share each
            torch.set_num_threads(int(threads))

    def perform_actual_validation(self, save_probabilities: bool = False):
        # Test-time mirroring quadruples the cost of predicting the test cases, a quarter of a CPU
        # fine-tune; every member is measured without it. The saved checkpoints keep nnU-Net's
        # mirroring axes (written before validation), so a later nnUNetv2_predict still mirrors.
        self.inference_allowed_mirroring_axes = None
        super().perform_actual_validation(save_probabilities)


__all__ = []


def _define_bench_variants() -> None:
    for name in product.__all__:
        if name.endswith("_cpu"):
            bench = name.removesuffix("_cpu") + "_bench"
            base = getattr(product, name)
            globals()[bench] = type(bench, (BenchSchedule, base), {
                "__module__": __name__, "__qualname__": bench,
                "__doc__": f"{base.__name__} with the benchmark schedule (nnunet_te.bench.trainers)."})
            __all__.append(bench)


_define_bench_variants()


def trainer_folder(root: str | os.PathLike) -> Path:
    """Write the shim module nnU-Net imports for ``-tr *_bench`` into ``<root>/trainers``; return
    the folder (to put into ``nnUNet_extTrainer``)."""
    folder = Path(root) / "trainers"
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / f"{SHIM_MODULE}.py"
    text = "from nnunet_te.bench.trainers import *  # noqa: F401,F403\n"
    if not shim.is_file() or shim.read_text() != text:
        shim.write_text(text)
    return folder
