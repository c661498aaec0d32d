"""Keyword arguments renamed by the one loss-argument convention (kdfast/ops/__init__.py): the old
name still works for one release, with a DeprecationWarning.

    @renamed_keywords(attention_mask="mask")
    def qa_kd_loss(..., mask=None, *, ...): ...
"""
from __future__ import annotations

import functools
import warnings


def renamed_keywords(**old_to_new):
    """Decorator: accept each old keyword as its new name, warn once per call site (DeprecationWarning).

    ``inspect.signature`` of the result is the new signature (functools.wraps sets ``__wrapped__``).
    Passing both names raises TypeError.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {new!r} and its old name {old!r}")
                    warnings.warn(f"{fn.__qualname__}(): {old}= is renamed {new}= and the old name goes in the "
                                  "next release", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return call
    return wrap
