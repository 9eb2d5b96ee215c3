"""The benchmark's training schedule on top of the product's CPU trainers.

``<name>_bench`` for every ``<name>_cpu`` trainer of :mod:`nnunet_te.training.trainers`
(``nnUNetTrainer_k5s0_bench``, ``RiskWeightedTrainer_k10s1_bench``, ``nnUNetTrainer_bench``, ...),
and beside each RiskWeightedTrainer variant its two controls (``RiskUniformControl_k5s0_bench``,
``RiskShuffledControl_k5s0_bench``, :mod:`benchmarks.finetune_grid.controls`):
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

nnU-Net finds these names through the one-line shim module in :data:`TRAINER_FOLDER`
(``nnunet_trainers/finetune_grid_trainer_classes.py``, which re-exports this module's ``__all__``):
the benchmark puts that folder first in ``nnUNet_extTrainer``, and the checkout root on
``PYTHONPATH`` so the shim can import ``benchmarks``, for its own ``nnUNetv2_train`` processes only
(:func:`subprocess_environment`). Outside the benchmark nnU-Net never sees these trainers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.finetune_grid.controls import CONTROL_TRAINERS, ShuffledWeightControl, UniformWeightControl
from nnunet_te.training import trainers as product

SCHEDULE_VARIABLES = ("nnUNet_te_bench_epochs", "nnUNet_te_bench_iterations", "nnUNet_te_bench_val_iterations")
THREADS_VARIABLE = "nnUNet_te_bench_threads"
#: The folder nnU-Net scans for ``-tr *_bench`` in the benchmark's subprocesses (a shim module only).
TRAINER_FOLDER = Path(__file__).resolve().parent / "nnunet_trainers"
#: The repository checkout holding ``benchmarks/``: on ``sys.path`` of those subprocesses.
CHECKOUT = Path(__file__).resolve().parents[2]


def read_schedule(environ=os.environ) -> tuple[int, int, int]:
    """(epochs, iterations per epoch, validation iterations per epoch) from the environment."""
    values = []
    for variable, default in zip(SCHEDULE_VARIABLES, (None, None, "2")):
        raw = environ.get(variable, default)
        if raw is None:
            raise RuntimeError(f"{variable} is not set: the *_bench trainers take their schedule from "
                               f"{', '.join(SCHEDULE_VARIABLES)} (python -m benchmarks.finetune_grid sets them)")
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


def _define(name: str, bases: tuple, doc: str) -> None:
    globals()[name] = type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    __all__.append(name)


def _define_bench_variants() -> None:
    mixins = {"RiskUniformControl": UniformWeightControl, "RiskShuffledControl": ShuffledWeightControl}
    for name in product.__all__:
        if name.endswith("_cpu"):
            base = getattr(product, name)
            bench = name.removesuffix("_cpu") + "_bench"
            _define(bench, (BenchSchedule, base),
                    f"{base.__name__} with the benchmark schedule (benchmarks.finetune_grid.trainers).")
            if name.startswith(f"{product.TRAINER}_"):  # the risk-weighting controls, same schedule and split
                for stem in CONTROL_TRAINERS.values():
                    _define(bench.replace(product.TRAINER, stem, 1), (mixins[stem], BenchSchedule, base),
                            f"{base.__name__} with the benchmark schedule and the {stem} weights "
                            "(benchmarks.finetune_grid.controls).")


_define_bench_variants()


def subprocess_environment(environ=os.environ) -> dict[str, str]:
    """``nnUNet_extTrainer`` and ``PYTHONPATH`` for an ``nnUNetv2_train`` process that must find the
    ``*_bench`` trainers: :data:`TRAINER_FOLDER` and :data:`CHECKOUT` put first, the values in
    ``environ`` kept after them (the product's trainer folder is appended at interpreter start by
    the ``.pth`` file that ``pip install`` writes)."""
    def first(path: Path, value: str | None) -> str:
        return os.pathsep.join([str(path), *(entry for entry in (value or "").split(os.pathsep)
                                             if entry and entry != str(path))])

    return {"nnUNet_extTrainer": first(TRAINER_FOLDER, environ.get("nnUNet_extTrainer")),
            "PYTHONPATH": first(CHECKOUT, environ.get("PYTHONPATH"))}
