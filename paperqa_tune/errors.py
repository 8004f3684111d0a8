"""The two failures every script maps to an exit code (cli.run_main): the input's fault (2) or the run's (1)."""


class InputError(Exception):
    """Bad usage or bad input: the scripts print the message and exit with code 2."""


class RunFailure(Exception):
    """A failure at run time that is not the input's fault (non-finite loss, out of memory at the smallest
    batch): the scripts print the message and exit with code 1."""
