"""The one exception type users see: a single line naming the file/field and the fix."""


class BertflowError(Exception):
    """A problem with the user's input or settings.

    The message is printed as one line by the CLI (no traceback), so it must say what is
    wrong, where (file, line, field), and what to do about it.
    """


def is_out_of_space(exc: BaseException) -> bool:
    """A full disk (or quota): the user's to fix, not a bug."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def out_of_space_message(exc: OSError) -> str:
    import os

    where = exc.filename or os.environ.get("BERTFLOW_HOME") or "the data home"
    return (f"no space left on the device writing {where}; nothing was registered. Free some space (`bertflow ls`"
            " shows the artifacts, `du -sh $BERTFLOW_HOME/*` their sizes) or set BERTFLOW_HOME to a bigger disk,"
            " then run the same command again")


class Stopped(BertflowError):
    """A run stopped on request (SIGTERM), at a point the same command resumes from.

    The CLI prints the message as one line and exits 128 + the signal's number, as a process
    killed by that signal would.
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
