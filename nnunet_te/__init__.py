"""nnunet_te: transferability estimation for nnU-Net."""

__version__ = "0.1.0"
