"""``kvstore serve``: its options are made from NodeConfig's declarations, one per setting.

Each option reads its ``KVSTORE_*`` variable (click's ``envvar``) and parses text with
the same ``NodeSetting.parse`` as ``NodeConfig.from_env``, so a flag and its variable
cannot drift. Precedence: the flag, then the variable, then NodeConfig's default.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kvstore.cli.output import examples
from kvstore.config import NodeConfig, NodeSetting, node_settings

__all__ = ["serve"]

LOG_LEVELS = ("debug", "info", "warning", "error")

_METAVARS = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH"}


class SettingType(click.ParamType):
    """A setting's value from the command line or its variable (NodeSetting.parse).

    A flag in other units than the field (``--block-cache-mb``) is scaled here; its
    variable is in the field's unit, as its name says (``KVSTORE_BLOCK_CACHE_BYTES``).
    """

    def __init__(self, setting: NodeSetting) -> None:
        self.setting = setting
        self.name = setting.type.__name__

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            parsed = self.setting.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if ctx is None or param is None or param.name is None:
            return parsed
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            return parsed
        if self.setting.choices and parsed not in self.setting.choices:
            self.fail(f"{value!r} is not one of {', '.join(self.setting.choices)}", param, ctx)
        return parsed * self.setting.flag_unit if self.setting.flag_unit != 1 else parsed


class BoolSettingType(click.types.BoolParamType):
    """A bool setting: a flag on the command line, true/false text in its variable."""

    def __init__(self, setting: NodeSetting) -> None:
        self.setting = setting

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool):
            return value
        try:
            return self.setting.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SettingOption(click.Option):
    """An option whose default, shown in help, is NodeConfig's (click's own stays None)."""

    def __init__(self, *args: Any, shown_default: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shown_default = shown_default

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        if self.shown_default:
            extra["default"] = self.shown_default
        return extra


def setting_option(setting: NodeSetting) -> click.Option:
    """The option of one NodeConfig field: its flag, variable, help and shown default."""
    help_ = setting.doc
    if setting.flag_unit != 1:
        help_ += f"; {setting.flag_unit_name} here, bytes in {setting.env}"
    if setting.type is bool:
        return click.Option(
            [setting.flag, setting.name],
            is_flag=True,
            type=BoolSettingType(setting),
            envvar=setting.env,
            show_envvar=True,
            help=help_,
        )
    shown = setting.shown_default
    if shown is None and setting.default is not None:
        shown = str(
            setting.default // setting.flag_unit if setting.flag_unit != 1 else setting.default
        )
    if setting.choices:
        metavar = "[" + "|".join(setting.choices) + "]"
    elif setting.flag_unit != 1:
        metavar = setting.flag_unit_name.upper()
    else:
        metavar = _METAVARS[setting.type]
    return SettingOption(
        [setting.flag, setting.name],
        type=SettingType(setting),
        default=None,  # NodeConfig's own default applies; help shows it
        shown_default=shown,
        envvar=setting.env,
        show_envvar=True,
        metavar=metavar,
        help=help_,
    )


@click.command(
    "serve",
    short_help="Run a storage node in the foreground until Ctrl-C or SIGTERM.",
    params=[setting_option(s) for s in node_settings()],
    epilog=examples(
        "kvstore serve --data ./var/kvstore --demo",
        "kvstore serve --host 127.0.0.1 --port 7071 --data /tmp/kv2",
        "KVSTORE_DATA=/srv/kv KVSTORE_BASE_FORMAT=block kvstore serve",
    ),
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    envvar="KVSTORE_LOG_LEVEL",
    show_envvar=True,
    help="what the node logs",
)
def serve(log_level: str, **settings: Any) -> None:
    """Run a storage node in the foreground until Ctrl-C or SIGTERM.

    Every setting is a flag or a KVSTORE_* environment variable (the flag wins).
    Sizes are in bytes and times in seconds unless the flag names another unit.
    """
    from kvstore.server.app import serve as run_node

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    given = {name: value for name, value in settings.items() if value is not None}
    run_node(NodeConfig(**given))
