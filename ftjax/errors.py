"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a checkpoint
that does not fit the model) raises `FtjaxError` with a one-line message that
names the bad value and says what was expected. Entry points print that line
and exit with status 1 instead of a traceback; everything else is a bug and
keeps its traceback.
"""


class FtjaxError(Exception):
  """An error in the user's input, reported as one line."""


class ConfigError(FtjaxError):
  """A config key or value that ftjax cannot use."""


class CheckpointError(FtjaxError):
  """Weights or files that do not match what the model expects."""


class WorkdirLocked(FtjaxError):
  """Another run holds the workdir (`ftjax.workdir_lock`); the message names it."""
