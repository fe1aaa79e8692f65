"""The ``connito`` command: ``connito <command> [hydra overrides]``."""

import os
import sys

USAGE = """usage: connito <command> [key=value ...] [hydra flags]

commands:
  train           train a MoE model with DeepSpeed (no arguments: the tiny quickstart on the bundled data)
  data prepare    build the domain-labelled corpus, tokenizer and packed sequences into the cache

Every command is a Hydra app: pass overrides as key=value, `--cfg job` prints the composed config,
`-m` runs a sweep (e.g. `connito train -m optim.lr=1e-3,3e-3`), `--help` lists the config groups.
"""


def _run_hydra_app(app, prog: str, args: list[str], schema) -> None:
    from connito.cli.overrides import unknown_key_message

    message = unknown_key_message(schema, args, prog.removeprefix("connito "))
    if message:
        print(message, file=sys.stderr)
        sys.exit(1)
    sys.argv = [prog, *args]
    app()


def _absorb_local_rank(args: list[str]) -> list[str]:
    """The deepspeed launcher may append --local_rank=N (unless --no_local_rank): keep it out of Hydra."""
    kept = []
    for arg in args:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> None:
    args = _absorb_local_rank(sys.argv[1:] if argv is None else list(argv))
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "train":
        from connito.cli.train_app import train_app
        from connito.training.config import ConnitoConfig

        _run_hydra_app(train_app, "connito train", rest, ConnitoConfig)
    elif command == "data" and rest[:1] == ["prepare"]:
        from connito.cli.data_app import data_prepare_app
        from connito.cli.schema import DataPrepareConfig

        _run_hydra_app(data_prepare_app, "connito data prepare", rest[1:], DataPrepareConfig)
    else:
        print(f"connito: unknown command '{' '.join(args[:2])}'\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
