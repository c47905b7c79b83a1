"""The command line: ``python -m nanobot`` (and ``python -m nanobot.cli``)."""

from __future__ import annotations

import click

from nanobot import __version__


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="nanobot")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """nanobot: persistent periodic tasks, component health and their history."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
