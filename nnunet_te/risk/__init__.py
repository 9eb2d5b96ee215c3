"""Transfer-risk maps and the risk-weighted segmentation loss (METHODS.md 1.7, seed 003)."""
