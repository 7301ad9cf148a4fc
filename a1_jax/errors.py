"""The one exception type for user mistakes.

Anything a person can fix by changing what they passed in (a path, a config, a checkpoint, an input video) raises
`UserError` with a message they can act on. The CLI prints it on one line and exits 2. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us: bad path, bad config, wrong checkpoint, unusable input."""
