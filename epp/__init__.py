"""epp: a cache-aware endpoint picker for the Gateway API Inference Extension."""

__version__ = "0.1.0"
