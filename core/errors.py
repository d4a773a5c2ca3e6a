"""User-facing errors: one line that names the bad thing and the fix."""


class UserError(Exception):
    """A problem with the user's input (file, config, argument), not a bug.

    The CLI prints ``str(error)`` as a single line on stderr and exits with code 2, so the message
    must name the offending thing and say how to fix it.
    """
