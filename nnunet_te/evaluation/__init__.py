"""Evaluating rankings against ground truth: correlation, regret and multi-target statistics."""
