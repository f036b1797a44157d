"""livefuse: real-time face-swap video service."""

__version__ = "0.1.0"
