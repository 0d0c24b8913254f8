"""trajflow: few-step distillation of flow-matching image models at cluster scale."""

__version__ = "0.1.0"
