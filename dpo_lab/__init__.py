"""dpo_lab: a Hydra-configured research framework for preference optimization."""

__version__ = "0.1.0"
