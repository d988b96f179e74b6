"""Framework adapters, shipped as ``reliable.integrations``."""
