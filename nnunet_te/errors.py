"""The one error type for a user's mistake: bad input, a missing prerequisite, an output that
would replace results. ``nnunet-te`` prints its message (with the command's name) instead of a
traceback; the message names the problem and the remedy that works where the user is."""


class UserError(ValueError):
    """A problem with the user's input or environment, with its remedy in the message.

    A ValueError, so callers that already catch ValueError keep working.
    """
