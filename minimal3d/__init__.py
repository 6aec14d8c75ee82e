"""minimal3d: readable pure-PyTorch reference implementations of 3D priors for 2D representations."""

__version__ = "0.1.0"
