"""The errors mpnas reports to its user, as opposed to its own bugs.

Every error caused by what the user gave mpnas (an experiment file, a search space, a corpus, a
checkpoint, a packed file, a precision map, an n-best file, an option or environment variable)
derives from :class:`MpnasError`. The command line prints those as ``mpnas: error: <message>`` and
exits with status 2; any other exception is a bug in mpnas and propagates with its traceback.
``MpnasError`` is a ``ValueError``, so code that catches ``ValueError`` keeps catching them.

This module imports nothing from mpnas, so every package can raise these errors.
"""

from __future__ import annotations


class MpnasError(ValueError):
    """A problem with the user's input; the message says which file, key or option, and what to do."""


class UsageError(MpnasError):
    """A command-line option or an environment variable has a value mpnas cannot use."""


class CheckpointError(MpnasError):
    """A checkpoint that is not a readable mpnas checkpoint, or does not fit the run it is given to."""
