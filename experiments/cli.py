"""What the absl launchers share: the preset read before the flags are defined, the flags
generated from it (`flare_jax.config_flags`), and one-line errors for bad input."""
from __future__ import annotations

import os
import sys
import contextlib
from typing import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

import jax

from flare_jax import checkpoint, config_flags, loop, mesh, runtime



class UserError(Exception):
    """Bad input (flags, files): reported in one line, without a traceback, exit status 2."""


# What a user can cause. A ValueError counts only where `bad_input` says so (building configs
# from flags, reading given files): one raised by a bug while training keeps its traceback.
USER_ERRORS = (UserError, loop.RunError, runtime.RunDirBusy, checkpoint.CheckpointError)


@contextlib.contextmanager
def bad_input():
    """Turns the ValueErrors of the block (config validation) into UserErrors."""
    try:
        yield
    except ValueError as err:
        raise UserError(str(err)) from None


def flag_from_argv(name: str, default: str, argv: Sequence[str] = None) -> str:
    """The value of `--name=value` / `--name value` in argv (before absl parses it)."""
    argv = sys.argv if argv is None else argv
    value = default
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def define_preset_flags(presets: dict, default: str, exclude: Sequence[str] = ()):
    """Defines --preset and one flag per config field, with the values of the preset named on
    the command line as defaults (an unknown name falls back to `default` here and is refused
    when main builds the config)."""
    flags.DEFINE_string("preset", default, f"one of {', '.join(sorted(presets))}; its values are "
                        "the defaults of the other flags (--preset=NAME --helpfull shows them)")
    flags.disclaim_key_flags()   # the flags belong to the launcher calling this (its --help)
    name = flag_from_argv("preset", default)
    config_flags.define_flags(presets.get(name, presets[default]), exclude=exclude)


def train(trainer_cls, config, module: str):
    """A launcher's run: the loop, the final evaluation of a finished run, its exit status.
    A multi-host run first joins its processes (`flare_jax.mesh.init_distributed`)."""
    rc = config.run
    mesh.init_distributed(rc.coordinator_address, rc.num_processes, rc.process_id)
    result = loop.run(trainer_cls, config, command=(module, sys.argv[1:]))
    if result.final and jax.process_index() == 0:
        step, returns = result.final
        print(f"final evaluation at {step:,d} {result.unit}: returns "
              f"{[round(r, 1) for r in returns]}; logs in {config.run.out_dir}")
    loop.exit_with(result)


def fail(message: str):
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "flare_jax"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _parse_flags(argv):
    """absl's flag parsing, a bad flag reported in one line (absl prints two), exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        fail(str(err))


def run_main(main: Callable, subcommands: Sequence[str] = ()):
    """`app.run(main)` with bad flags and the USER_ERRORS of main turned into one line on stderr
    and exit status 2. With `subcommands`, argv must name exactly one of them (main gets
    [program, subcommand]); without, positional arguments are refused."""
    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
            absl_logging.set_verbosity(absl_logging.WARNING)
        if subcommands:
            if len(argv) != 2 or argv[1] not in subcommands:
                got = f" (got: {' '.join(argv[1:])})" if len(argv) > 1 else ""
                fail(f"give one subcommand: {', '.join(subcommands)}{got}")
        elif len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            return main(argv)
        except USER_ERRORS as err:
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    app.run(wrapped, flags_parser=_parse_flags)
