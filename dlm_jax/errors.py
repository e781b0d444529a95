"""User-facing errors.

Anything the user can fix (a config value, a data path, a workdir, a prompt) raises `DLMError` with one sentence that
names the problem and the fix. The command-line entry points print it as a single line and exit non-zero; library
callers get an ordinary exception.
"""


class DLMError(Exception):
  """An error caused by user input; the message says what is wrong and how to fix it."""
