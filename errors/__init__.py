"""The one root of every error a user can fix, and its kinds.

The CLI prints a `UserError` as one plain line (exit status 2) and everything else with its
traceback and a line saying it is a bug, so an internal `KeyError('prob_MEL')` is never mistaken
for a user's mistake. Each kind names what the user got wrong; its message names the file, row or
option and the fix. A leaf: it imports nothing of the pipeline, so every layer can raise these.

>>> issubclass(DataError, UserError), issubclass(KeyError, UserError)
(True, False)
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what to do."""


class DataError(UserError):
    """Input data the pipeline cannot use; the message names the file, the row and the fix."""


class OptionError(UserError):
    """An option or argument value that cannot be used; the message names the option and the allowed values."""


class RunStateError(UserError):
    """A run directory (or bundle) that is not in the state the command needs: a stage not run yet,
    interrupted, or run on other data; the message names the command that repairs it."""
