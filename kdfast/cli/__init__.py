"""The ``kdfast`` command line (``python -m kdfast`` or the ``kdfast`` console script)."""
from kdfast.cli.main import main

__all__ = ["main"]
