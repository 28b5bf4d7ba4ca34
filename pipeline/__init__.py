"""bmsync: air-gapped container image bundles and mirror sync."""

__version__ = "0.1.0"
