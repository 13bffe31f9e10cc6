"""modelctl: a supervisor and process manager for model servers on one machine."""

__version__ = "0.2.0"
