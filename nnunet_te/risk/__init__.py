"""Transfer-risk maps and the risk-weighted segmentation loss.

After Zhang et al., "Transfer Risk Map: Mitigating Pixel-level Negative Transfer in Medical
Segmentation", 2025, https://arxiv.org/abs/2502.02340; what the package computes and decides is in
docs/nnunet.md sections 3-4.
"""
