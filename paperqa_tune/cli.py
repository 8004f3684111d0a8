"""What makes the four scripts behave alike on the command line: the exit codes (run_main), --help's style,
dashed aliases of the seed's underscored flags, and finite float flags."""
from __future__ import annotations

import argparse
import errno
import sys

from paperqa_tune.errors import InputError, RunFailure
from paperqa_tune.files import link_loop_text, os_error_text


def run_main(fn, argv=None, interrupted: str = "work done so far is saved, rerun the same command to resume",
             show_errors: bool = True) -> int:
    """Call a script body with the documented exit codes: InputError -> 2, RunFailure -> 1, Ctrl-C -> 130, and
    a file-system error no step converted: permissions or a looping link -> 2, anything else (a full disk) -> 1;
    each with a one-line message on stderr, never a traceback (show_errors False: no message, e.g. on all but one
    process)."""
    try:
        return fn(argv)
    except InputError as e:
        code, msg = 2, f"error: {e}"
    except RunFailure as e:
        code, msg = 1, f"error: {e}"
    except PermissionError as e:  # a file-system error no step converted: the setup's problem
        code, msg = 2, f"error: {os_error_text(e)}: check the permissions there, or choose another path"
    except OSError as e:  # e.g. a full disk while appending to a cache, stdout closed under a pipe
        if e.errno == errno.ELOOP:  # a looping link no check caught (Python 3.13 raises it on open): the input's fault
            code, msg = 2, f"error: {link_loop_text(e.filename or '(a path)')}"
        else:
            code, msg = 1, f"error: {os_error_text(e)}"
    except KeyboardInterrupt:
        code, msg = 130, f"interrupted; {interrupted}"
    if show_errors:
        print(msg, file=sys.stderr)
    return code


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the module docstring as written, and every flag's default after its help unless
    the help already says what the default is ("default:" in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_flag(group, name: str, **kw):
    """group.add_argument(name, **kw), also accepting the dashed spelling of an underscored flag
    (--max-tokens for --max_tokens) without listing it in --help: commands written before the flags took
    the seed's underscores keep working."""
    action = group.add_argument(name, **kw)
    if "_" in name:
        hidden = {k: v for k, v in kw.items() if k not in ("help", "default", "dest")}
        group.add_argument(name.replace("_", "-"), dest=action.dest, help=argparse.SUPPRESS,
                           default=argparse.SUPPRESS, **hidden)
    return action




def finite_float(text: str) -> float:
    """argparse type for a float flag: a finite number. inf and nan (any spelling float() takes) are refused at parse
    time, so argparse exits 2 naming the flag ("argument --lr: ..."), before anything is read or written."""
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a finite value")
    return value
