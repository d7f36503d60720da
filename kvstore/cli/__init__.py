"""The ``kvstore`` command: a thin layer over NodeConfig (serve), kvstore.ingest (load,
consume) and Client (the rest).

Every command is registered below, by name, from the module of its group; a failure
the user can act on (a KvstoreError, a bad file or value, an unreachable node) prints
one line, ``kvstore COMMAND: error: …``, and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from kvstore.cli.cluster import cluster, drain
from kvstore.cli.consume import consume
from kvstore.cli.data import delete, get, write
from kvstore.cli.loads import load, rollback, versions
from kvstore.cli.output import examples
from kvstore.cli.serve import serve
from kvstore.cli.status import status
from kvstore.cli.tables import create_table, describe, drop, tables
from kvstore.errors import KvstoreError

__all__ = ["cli", "main"]


class CommandFailed(click.ClickException):
    """A command that ran and failed: one line on stderr naming the command, exit 1."""

    exit_code = 1

    def __init__(self, command: str | None, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.command = command

    def show(self, file: Any = None) -> None:
        click.echo(f"kvstore {self.command}: error: {self.message}", err=True)


class KvstoreGroup(click.Group):
    """Lists commands in the order they were registered and turns failures into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KvstoreError, OSError, ValueError) as exc:
            raise CommandFailed(ctx.invoked_subcommand, exc) from None
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None


@click.group(
    "kvstore",
    cls=KvstoreGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=examples(
        "kvstore serve --data ./var/kvstore --demo      start a node on 127.0.0.1:7070",
        "kvstore tables                                  list the tables",
        "kvstore get demo_users 42 43 --features age,ctr_7d",
    )
    + "\n\n'kvstore COMMAND --help' explains each command.",
)
def cli() -> None:
    """kvstore: a low-latency key-value store for machine-learning features."""


for command in (
    serve,
    status,
    tables,
    describe,
    create_table,
    drop,
    get,
    write,
    delete,
    load,
    versions,
    rollback,
    consume,
    cluster,
    drain,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvstore`` command; returns the exit status."""
    try:
        status_ = cli.main(args=argv, prog_name="kvstore", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
    return status_ if isinstance(status_, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
