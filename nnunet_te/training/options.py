"""RiskWeightedTrainer's options, set without editing code.

Each option is read, in order of precedence, from an environment variable, from the entry
``"nnunet_te"`` of the plans file (``{"nnunet_te": {"beta": 2.0, ...}}`` at the top level of
``nnUNetPlans.json``), or falls back to its default:

====================  ==============================  ==========  =======================================================
option                environment variable            default     meaning
====================  ==============================  ==========  =======================================================
``beta``              ``nnUNet_te_beta``              1.0         weight scale: ``w = 1 + beta r``
``weighting``         ``nnUNet_te_weighting``         linear      ``linear`` (1 + beta r) or ``exp`` (exp(beta r))
``sigma``             ``nnUNet_te_sigma``             1.0         smoothing of -T (voxels) when maps are computed
``ce_normalisation``  ``nnUNet_te_ce_normalisation``  pixels      what a patch's weighted cross-entropy is divided by:
                                                                  ``pixels`` (its pixel count, nnU-Net's own scale) or
                                                                  ``foreground`` (its foreground pixels + 1, as in
                                                                  the Transfer Risk Map paper)
``refresh_every``     ``nnUNet_te_refresh_every``     0           recompute maps from the current network every
                                                                  N epochs (0: never)
``checkpoint``        ``nnUNet_te_risk_checkpoint``   ""          checkpoint the maps are computed from when
                                                                  missing ("": the network as initialised,
                                                                  i.e. the ``-pretrained_weights`` encoder)
``zoo``               ``nnUNet_te_zoo``               ""          zoo file (``nnunet-te rank --zoo``): at the
                                                                  first start, rank it on the run's training
                                                                  cases and start from the best nnU-Net-
                                                                  compatible candidate instead of
                                                                  ``-pretrained_weights``; a ``--c`` resume
                                                                  keeps the first start's choice
====================  ==============================  ==========  =======================================================

``nnUNet_te_overwrite=1`` is not an option of the run but a permission: a start without ``--c`` in a
fold folder that holds a finished run (``checkpoint_final.pth``) is refused unless it is set, since it
would replace the trainer's files there (``risk_options.json``, the risk-source network and maps, the
zoo choice); nnU-Net itself replaces its own checkpoints and logs in that case.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

import numpy as np

from nnunet_te.errors import UserError
from nnunet_te.risk.loss import check_ce_normalisation
from nnunet_te.risk.maps import risk_weights

#: Top-level key of the plans file holding option values.
PLANS_KEY = "nnunet_te"
#: Environment variable of each option.
ENVIRONMENT = {
    "beta": "nnUNet_te_beta",
    "weighting": "nnUNet_te_weighting",
    "sigma": "nnUNet_te_sigma",
    "ce_normalisation": "nnUNet_te_ce_normalisation",
    "refresh_every": "nnUNet_te_refresh_every",
    "checkpoint": "nnUNet_te_risk_checkpoint",
    "zoo": "nnUNet_te_zoo",
}

#: Largest beta of the ``exp`` weighting: exp(88.7) is float32's largest value.
MAX_EXP_BETA = 80.0
#: Set to 1 to let a fresh start (no ``--c``) replace the trainer's own files (risk options, maps,
#: source network, zoo choice) in a fold folder that holds a finished run (``checkpoint_final.pth``).
OVERWRITE_VARIABLE = "nnUNet_te_overwrite"


def overwrite_allowed(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether :data:`OVERWRITE_VARIABLE` is set to 1 (``""``/``0`` or unset: no); other values raise."""
    value = environ.get(OVERWRITE_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise UserError(f"{OVERWRITE_VARIABLE} must be 1 (replace) or 0, got {value!r}")
    return value == "1"


@dataclasses.dataclass(frozen=True)
class RiskOptions:
    """Validated options of :class:`nnunet_te.training.trainers.RiskWeightedTrainer`."""

    beta: float = 1.0
    weighting: str = "linear"
    sigma: float = 1.0
    ce_normalisation: str = "pixels"
    refresh_every: int = 0
    checkpoint: str = ""
    zoo: str = ""

    def __post_init__(self):
        for name in ("beta", "sigma"):  # NaN passes every comparison, inf every lower bound
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"{name} ({ENVIRONMENT[name]}) must be a finite number >= 0, got {value!r}")
        risk_weights(np.zeros(1), beta=self.beta, weighting=self.weighting)  # raises on bad values
        if self.weighting == "exp" and self.beta > MAX_EXP_BETA:
            raise UserError(f"beta ({ENVIRONMENT['beta']}) must be <= {MAX_EXP_BETA} with weighting exp "
                            f"(exp(beta r) overflows float32 above 88), got {self.beta!r}")
        check_ce_normalisation(self.ce_normalisation)
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0 = never), got {self.refresh_every}")
        for name in ("checkpoint", "zoo"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):  # fail at trainer construction, not after an epoch
                raise ValueError(f"{ENVIRONMENT[name]}: {path} is not a file")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_options(plans: Mapping, environ: Mapping[str, str] = os.environ) -> RiskOptions:
    """:class:`RiskOptions` from ``environ`` over ``plans[PLANS_KEY]`` over the defaults.

    Raises ValueError naming the source for an unknown plans key or an unparsable value.
    """
    from_plans = dict(plans.get(PLANS_KEY, {}))
    unknown = set(from_plans) - set(ENVIRONMENT)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in the plans entry {PLANS_KEY!r}; "
                         f"known: {sorted(ENVIRONMENT)}")
    values = {}
    for field in dataclasses.fields(RiskOptions):
        variable = ENVIRONMENT[field.name]
        if environ.get(variable, "") != "":
            raw, source = environ[variable], f"environment variable {variable}"
        elif field.name in from_plans:
            raw, source = from_plans[field.name], f"plans entry {PLANS_KEY}.{field.name}"
        else:
            continue
        try:
            values[field.name] = type(field.default)(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: cannot read {raw!r} as {type(field.default).__name__}") from err
    return RiskOptions(**values)


def check_options_take_effect(options: RiskOptions, num_epochs: int) -> None:
    """Raise UserError for an option that would be set but never act on this run: a refresh
    interval ``nnUNet_te_refresh_every`` at or beyond the run's ``num_epochs`` (maps are refreshed
    after epochs ``N, 2N, ...`` before the last). Called at train start, when the schedule is final."""
    if options.refresh_every and options.refresh_every >= num_epochs:
        raise UserError(f"{ENVIRONMENT['refresh_every']}={options.refresh_every} never takes effect: this run has "
                        f"{num_epochs} epoch(s) and refreshes after epochs N, 2N, ... before the last; set it "
                        f"below {num_epochs}, or to 0 (or unset it) for no refresh")
