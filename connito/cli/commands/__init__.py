"""The ``connito`` commands, one module each.

Every module here defines ``COMMAND = Command(...)`` (:class:`connito.cli.command.Command`) and has a primary
YAML ``configs/<config_name>.yaml``. :func:`connito.cli.command.discover` finds them; keep module-level imports
light (configs only) so that ``connito --help`` does not load the trainer.
"""
