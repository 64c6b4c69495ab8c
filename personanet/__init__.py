"""PersonaNet: train models on personal records under differential privacy."""

__version__ = "0.1.0"
