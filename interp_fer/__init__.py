"""interp_fer: interpretability for facial-expression-recognition CNNs."""

__version__ = "0.1.0"
