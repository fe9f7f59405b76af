"""rlhf: the server side of the platform (model services, trainer, model store)."""

__version__ = "0.1.0"
