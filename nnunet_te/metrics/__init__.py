"""Transferability metrics: pure functions on arrays, one module per family.

Every function validates its input, computes in float64 and documents its formula, shapes and
direction. ``registry.METRICS`` names them for the CLI and the ranking.
"""

from nnunet_te.metrics.ccfv import ccfv
from nnunet_te.metrics.consistency import adapted_rand_error, effective_invariance
from nnunet_te.metrics.logme import logme
from nnunet_te.metrics.gbc import gbc
from nnunet_te.metrics.hscore import h_score, regularized_h_score
from nnunet_te.metrics.leep import leep, leep_per_sample, nce, nleep
from nnunet_te.metrics.lpfu import lp_fu, lp_score
from nnunet_te.metrics.ncti import ncti, ncti_components
from nnunet_te.metrics.parc import parc
from nnunet_te.metrics.sfda import sfda
from nnunet_te.metrics.topology import FusionGate, fit_gate, fuse, grtd, lbtc
from nnunet_te.metrics.transrate import transrate

__all__ = [
    "FusionGate", "adapted_rand_error", "ccfv", "effective_invariance", "fit_gate", "fuse", "gbc",
    "grtd", "h_score", "lbtc", "leep", "leep_per_sample", "logme", "lp_fu", "lp_score", "nce",
    "ncti", "ncti_components", "nleep", "parc", "regularized_h_score", "sfda", "transrate",
]
