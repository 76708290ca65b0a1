"""The one exception type users see: a single line naming the file/field and the fix."""


class BertflowError(Exception):
    """A problem with the user's input or settings.

    The message is printed as one line by the CLI (no traceback), so it must say what is
    wrong, where (file, line, field), and what to do about it.
    """
