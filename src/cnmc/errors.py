"""User-facing errors: the CLI prints these as one line, without a traceback."""


class CnmcError(Exception):
    """A problem the user can fix (bad input, bad configuration, missing file).

    The message must name the file or setting and the problem in one line.
    """
