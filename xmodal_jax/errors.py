"""The one exception type for mistakes a user can fix (config, data names, files)."""


class UserError(ValueError):
    """A bad config, name or file; the CLI prints its message as one line and exits non-zero."""
