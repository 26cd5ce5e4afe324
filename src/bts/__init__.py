"""Branch-Train-Stitch (Zhang et al., arXiv 2502.00075) and its baselines, on PyTorch Lightning."""

__version__ = "0.1.0"
