"""Evaluating rankings against ground truth: correlation, regret and multi-target statistics."""

from nnunet_te.evaluation.statistics import (
    critical_difference_plot,
    evaluate_ranking,
    friedman,
    kendall_tau_b,
    nemenyi_cd,
    rank_methods,
    spearman,
    top1_regret,
    top1_relative_accuracy,
    weighted_tau,
)

__all__ = [
    "critical_difference_plot", "evaluate_ranking", "friedman", "kendall_tau_b", "nemenyi_cd",
    "rank_methods", "spearman", "top1_regret", "top1_relative_accuracy", "weighted_tau",
]
