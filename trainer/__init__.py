"""The ganforge trainer: config, models, objectives, the D/G loop, checkpoints and telemetry."""

__version__ = "0.1.0"
