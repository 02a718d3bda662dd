"""torchcfm's ``version``: ``__version__`` is the torchcfm release whose API this drop-in mirrors (ot-cfm's own
version is ``ot_cfm.__version__``)."""

__all__ = ["__version__"]

__version__ = "1.0.7"
