"""The one exception type for bad user input; `experiments/*` turn it into one error line."""


class UserError(Exception):
  """A problem with the user's config, data or workdir; the message says what and where."""
