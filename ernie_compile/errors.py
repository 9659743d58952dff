"""The two kinds of failure (STYLE: "Config, CLI, errors"), and the one place the CLIs turn the
expected ones into a one-line message.

UserError: the input is wrong (a path, a flag, a checkpoint, an artifact). InternalError: an
invariant of ours broke; it carries context and is a bug to report, so it keeps its traceback.
`run_cli` is shared by ernie-compile, ernie-run and ernie-tune: a user error, Ctrl-C, SIGTERM, a
closed stdout or a failing disk each end in one line on stderr and exit code 2, so a script or a
user never has to read a traceback for something that is not our bug.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading

USER_ERROR_EXIT = 2

# OSErrors that come from the machine or the user's paths (a full disk, a read-only or forbidden
# folder, a path that is not there), not from a bug of ours: reported in one line.
EXPECTED_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                   errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EPIPE,
                   errno.ENAMETOOLONG, errno.EMFILE}


class UserError(Exception):
    """Bad input, explained in one line."""


class InternalError(RuntimeError):
    """A broken invariant inside ernie-compile."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and `except
    BaseException` cleanup (compiler/package.py's staging folder) runs for it too."""


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default: its help text's own "default: …" wording where it has
    one (a default that depends on the target), else "(default: VALUE)", "off" for a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The CLIs' argparse: errors are UserErrors (one line through `run_cli`, instead of
    argparse's usage block), and --help shows defaults (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _raise_terminated(signum, frame):
    raise Terminated()


def _silence_stdout_if_broken() -> None:
    """If stdout is the stream that failed, point it at /dev/null: after a broken pipe or a full
    disk the interpreter's own flush at exit would fail again and print 'Exception ignored …' under
    our one line. A stdout that still flushes (the failure was another file's) is left alone."""
    try:
        sys.stdout.flush()
        return
    except (OSError, ValueError, AttributeError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout closed or replaced (pytest's capture)
        pass


def _fail(prog: str, message: str) -> int:
    try:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone: the exit code is all that is left
        pass
    return USER_ERROR_EXIT


def _os_message(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.EPIPE:
        return "output closed before everything was written (broken pipe)"
    return f"{where}{e.strerror or os.strerror(e.errno)}"


def run_cli(prog: str, fn) -> int:
    """Call fn() (returns the exit code) with SIGTERM raising Terminated; turn every expected
    failure into `PROG: error: MESSAGE` on stderr and exit code 2. Anything else (InternalError,
    an unexpected exception) propagates with its traceback: that is a bug to report."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return fn()
    except UserError as e:
        return _fail(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Terminated:
        return _fail(prog, "terminated (SIGTERM)")
    except KeyboardInterrupt:
        return _fail(prog, "interrupted (Ctrl-C)")
    except OSError as e:
        if e.errno not in EXPECTED_ERRNOS:
            raise
        _silence_stdout_if_broken()
        return _fail(prog, _os_message(e))
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
