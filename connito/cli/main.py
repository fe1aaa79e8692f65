"""The ``connito`` command: ``connito <command> [hydra overrides]``; the commands are in :mod:`connito.cli.commands`.

Bad input (a missing path, a bad value, a file that cannot be read or written; :mod:`connito.cli.errors` says
exactly what counts) is reported as one line, ``connito <command>: <what is wrong and the fix>``, without a Python
traceback, and the command exits with status 2. ``--traceback`` anywhere on the command line (or the environment
variable ``CONNITO_TRACEBACK=1``) prints the traceback as well. A pipeline whose job failed (``connito quickstart``,
``btx``, ``flexolmo``, ``groups``, ``federated``) prints which job, its reason and log and how to run only the
unfinished jobs, without a traceback, and exits with status 1. Any other error is a bug: its traceback is printed
and the command exits with status 1.
"""

import os
import sys
from collections.abc import Sequence

# Light imports only up here: the library environment defaults must be set before anything imports datasets.
from connito.cli.command import Command, check_table, discover, find, hydra_app
from connito.cli.errors import EXIT_USER_ERROR, TRACEBACK_ENV, TRACEBACK_FLAG, exit_if_user_error
from connito.cli.logs import set_library_env_defaults
from connito.cli.overrides import unknown_key_message

USAGE_FOOTER = """Every command is a Hydra app: pass overrides as key=value, `--cfg job` prints the composed config,
`-m` runs a sweep (e.g. `connito train -m optim.lr=1e-3,3e-3`), `--help` lists the config groups.
Bad input is reported in one line (exit status 2), a pipeline's failed job with its log (exit status 1);
`--traceback` (or CONNITO_TRACEBACK=1) adds the Python traceback.
"""


def usage(commands: Sequence[Command]) -> str:
    width = max([12, *(len(command.name) for command in commands)]) + 4
    rows = "\n".join(f"  {command.name:<{width}}{command.summary}" for command in commands)
    return f"usage: connito <command> [key=value ...] [hydra flags]\n\ncommands:\n{rows}\n\n{USAGE_FOOTER}"


def _absorb_local_rank(args: list[str]) -> list[str]:
    """The deepspeed launcher may append --local_rank=N (unless --no_local_rank): keep it out of Hydra."""
    kept = []
    for arg in args:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


def _absorb_traceback_flag(args: list[str]) -> list[str]:
    """``--traceback``: user errors print their traceback too (in this process and the jobs it starts)."""
    if TRACEBACK_FLAG in args:
        os.environ[TRACEBACK_ENV] = "1"
    return [arg for arg in args if arg != TRACEBACK_FLAG]


def main(argv: list[str] | None = None, commands: Sequence[Command] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command of ``commands`` (default: the discovered table)."""
    set_library_env_defaults()  # before any command module imports datasets / transformers
    commands = discover() if commands is None else check_table(commands)
    args = _absorb_traceback_flag(_absorb_local_rank(sys.argv[1:] if argv is None else list(argv)))
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(commands))
        sys.exit(0 if args else 2)
    found = find(commands, args)
    if found is None:
        width = max([1, *(len(c.words) for c in commands if c.words[0] == args[0])])
        print(f"connito: unknown command '{' '.join(args[:width])}'\n\n{usage(commands)}", file=sys.stderr)
        sys.exit(2)
    command, rest = found
    message = unknown_key_message(command.schema, rest, command.name)
    if message:
        print(message, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.argv = [f"connito {command.name}", *rest]
    run_reporting_user_errors(command)


def run_reporting_user_errors(command: Command) -> None:
    """Run ``command``'s Hydra app; a user error (:func:`connito.cli.errors.user_message`) ends it with its one
    line and exit status 2 (inside the app, or here for an override Hydra could not compose), any other exception
    propagates with its traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own trimmed traceback and hint
    try:
        hydra_app(command)()
    except Exception as err:
        exit_if_user_error(err, command.name, started=False)
        raise


if __name__ == "__main__":
    main()
