"""What every verb of the `ftlaunch` command shares: the bad-input error and recipe loading."""

from __future__ import annotations

from collections.abc import Sequence

import click

from launcher.errors import EXIT_BAD_INPUT, BadInputError
from launcher.recipe import RecipeError, load_recipe


class BadInput(click.ClickException, BadInputError):
    """Bad input from the user: printed without a traceback, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def load_or_exit(path: str, overrides: Sequence[str]):
    """Load a recipe, turning every recipe problem into exit code 2 with its message."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as exc:
        raise BadInput(exc.render()) from None


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe field, value parsed as YAML (e.g. --set train.lr=3e-5). Repeatable.",
)
