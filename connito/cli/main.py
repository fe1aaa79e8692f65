"""The ``connito`` command: ``connito <command> [hydra overrides]``; the commands are in :mod:`connito.cli.commands`."""

import os
import sys
from collections.abc import Sequence

# Light imports only up here: the library environment defaults must be set before anything imports datasets.
from connito.cli.command import Command, check_table, discover, find, hydra_app
from connito.cli.logs import set_library_env_defaults
from connito.cli.overrides import unknown_key_message

USAGE_FOOTER = """Every command is a Hydra app: pass overrides as key=value, `--cfg job` prints the composed config,
`-m` runs a sweep (e.g. `connito train -m optim.lr=1e-3,3e-3`), `--help` lists the config groups.
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


def main(argv: list[str] | None = None, commands: Sequence[Command] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command of ``commands`` (default: the discovered table)."""
    set_library_env_defaults()  # before any command module imports datasets / transformers
    commands = discover() if commands is None else check_table(commands)
    args = _absorb_local_rank(sys.argv[1:] if argv is None else list(argv))
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
        sys.exit(1)
    sys.argv = [f"connito {command.name}", *rest]
    hydra_app(command)()


if __name__ == "__main__":
    main()
