"""First-party tracking proxy for Mixpanel with cross-domain identity."""

__version__ = "0.1.0"
