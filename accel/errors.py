"""The exception types for bad user input; `experiments/*` turn them into one error line
(`accel.faults.main`): exit status 2 for a bad config, 1 for any other UserError."""


class UserError(Exception):
  """A problem with the user's config, data or workdir; the message says what and where."""


class ConfigError(UserError):
  """A config value that no run can use (found before anything is prepared or compiled)."""
