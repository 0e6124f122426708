"""moelab: Mixture-of-Experts research on Lightning + Hydra."""

__version__ = "0.1.0"
