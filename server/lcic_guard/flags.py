"""Every setting of lcic-guard, declared once: the table :data:`SETTINGS`.

A row is one setting: which commands have it (its group), its flag, where it
lands in the :class:`~lcic_guard.config.Settings` tree, the kind of value it
takes (how its text is read and its default shown) and its help. From the
table come the commands' flags and their ``--help`` (``add_*_flags``), the
``Settings`` a parsed command builds (:func:`settings_from`) and
docs/configuration.md (scripts/gen_config_doc.py, run by scripts/generate).

Defaults are not in the table: a row reads its default from the field it
lands in (``Settings``, ``PolicyConfig``, ``ReconcilerConfig``), next to the
code that uses it, so a program building those directly gets the same ones.

To add a setting: give the field its default where it lands, then add one
row to :data:`SETTINGS` in the group of the commands that take it, and run
scripts/generate. Its flag, environment variable, ``--help`` line, the
Settings it builds and its line in the document all follow from the row, and
tests/docs/test_settings_table.py checks them against each other (it needs
an example value only for a new kind). A value only a command reads (the
client commands' --target) has no field: its row gives its default.

Every flag ``--some-flag`` can also be given as ``LCIC_GUARD_SOME_FLAG``; a
flag on the command line wins over the environment, which wins over the
default. Durations take a unit: ``500ms``, ``30s``, ``5m``, ``24h``, ``60d``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lcic_guard import metrics
from lcic_guard.config import Settings
from lcic_guard.domain.policy import DURATION_UNITS, Check, format_duration
from lcic_guard.logs import redact_url
from lcic_guard.sidecar.identities import parse_identity, read_token_file

ENV_PREFIX = "LCIC_GUARD_"
_UNITS = DURATION_UNITS
_PART = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)"
_DURATION = re.compile(rf"\s*(?:{_PART}\s*)+")
_PARTS = re.compile(_PART)

# -- reading a value's text ---------------------------------------------------------------


def parse_duration(text: str) -> int:
    """Parse a duration such as ``24h`` or ``1h30m`` into milliseconds."""
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), "
            "e.g. 24h or 1h30m"
        )
    return sum(int(float(n) * _UNITS[unit]) for n, unit in _PARTS.findall(text))


def parse_duration_or_off(text: str) -> int:
    """A duration, or ``0`` (no unit needed) for off."""
    return 0 if text.strip() == "0" else parse_duration(text)


def parse_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("open", "closed"):
        raise argparse.ArgumentTypeError(f"invalid failure mode {text!r}: use open or closed")
    return mode


def parse_metrics_listen(text: str) -> str:
    """``HOST:PORT`` for the metrics endpoint, or empty (off)."""
    text = text.strip()
    if text.lower() in ("", "off", "none"):
        return ""
    try:
        metrics.parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_shadow(text: str) -> frozenset[Check]:
    """``create,enter,recording`` (any subset; ``all``; empty or ``none``: off)."""
    out: set[Check] = set()
    for part in text.replace(" ", "").lower().split(","):
        if part in ("", "none", "off"):
            continue
        if part == "all":
            out.update(Check)
            continue
        try:
            out.add(Check(part))
        except ValueError:
            raise ValueError(
                f"invalid shadow check {part!r}: use create, enter, recording or all"
            ) from None
    return frozenset(out)


def parse_shadow_checks(text: str) -> frozenset[Check]:
    """The checks in shadow mode: ``create,enter,recording``, ``all`` or empty."""
    try:
        return parse_shadow(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_listen(text: str) -> str:
    """``HOST:PORT`` to listen on; port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid address {text!r}: use HOST:PORT with a port from 0 to 65535, "
            "e.g. 127.0.0.1:50051"
        )
    return text.strip()


REDIS_SCHEMES: tuple[str, ...] = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")


def parse_redis_url(text: str) -> str:
    """A Redis URL the store can connect to, checked here (the one place every
    command's --redis-url and LCIC_GUARD_REDIS_URL go through), so that a typo
    is one line at start rather than a failure inside the client."""
    url = text.strip()
    scheme, sep, rest = url.partition("://")
    problem = None
    if not sep or scheme.lower() not in REDIS_SCHEMES or not rest:
        problem = "unknown form"
    else:
        problem = _redis_url_problem(scheme.lower(), rest)
    if problem is not None:
        shown = redact_url(url)
        why = "" if problem == "unknown form" else f" ({problem})"
        raise argparse.ArgumentTypeError(
            f"invalid Redis URL {shown!r}{why}: use redis://HOST:PORT/DB (rediss:// for TLS, "
            "redis+sentinel://HOST:PORT/SERVICE for Sentinel)"
        )
    return url


def _redis_url_problem(scheme: str, rest: str) -> str | None:
    """What the Redis client would reject in a URL, found before it does."""
    rest = rest.partition("#")[0].partition("?")[0]
    netloc, _, path = rest.partition("/")
    if scheme == "unix":
        return None if path or netloc else "no socket path"
    hosts = netloc.rpartition("@")[2]
    items = hosts.split(",") if scheme.endswith("+sentinel") else [hosts]
    for item in items:
        host, port = _host_port(item.strip())
        if not host:
            return "no host"
        if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"port {port!r} is not a number from 1 to 65535"
    parts = [p for p in path.split("/") if p]
    if scheme.endswith("+sentinel"):
        if not parts or len(parts) > 2:
            return "no service name after the host"
        db = parts[1] if len(parts) == 2 else "0"
    else:
        if len(parts) > 1:
            return f"path {path!r} is not a database number"
        db = parts[0] if parts else "0"
    if not db.isdigit():
        return f"database {db!r} is not a number"
    return None


def _host_port(item: str) -> tuple[str, str | None]:
    if item.startswith("["):  # [IPv6]:port
        host, _, tail = item[1:].partition("]")
        return host, tail[1:] if tail.startswith(":") else None
    host, colon, port = item.partition(":")
    return host, port if colon else None


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}: use true or false")


def parse_durations(text: str) -> tuple[int, ...]:
    """``30d,7d,1d`` into milliseconds; empty or ``off`` for none."""
    if text.strip().lower() in ("", "off", "none"):
        return ()
    return tuple(parse_duration(x) for x in text.split(",") if x.strip())


def parse_list(text: str) -> tuple[str, ...]:
    """``a,b, c`` into ``("a", "b", "c")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


# -- kinds of value -----------------------------------------------------------------------


def _replaced(_old: Any, new: Any) -> Any:
    return new


@dataclass(frozen=True)
class Kind:
    """The type of a setting: how its text (flag or environment) is read, and
    how the value of the field it lands in is written back as such text."""

    name: str
    parse: Callable[[str], Any]
    """Text to value; a bad text raises ArgumentTypeError (or ValueError)
    saying how to write one. argparse names a plain function's failure after
    it ("invalid int value"), so the parsers are the ones the flags always had."""
    show: Callable[[Any], str | None] = str
    """The field's value as the flag takes it (its default in ``--help`` and
    the doc); ``None``: shown as no default."""
    land: Callable[[Any, Any], Any] = _replaced
    """The field's new value from its current one and the parsed value."""
    repeatable: bool = False
    """Repeatable flag: the first use replaces the environment's value, later
    ones add to it."""
    redact: Callable[[Any], str | None] | None = None
    """How a default from the environment is shown in ``--help`` (a secret)."""
    switch: bool = False
    """A flag alone, taking no value (the environment: true, yes, on or 1)."""


def duration(unit: str | None = None, *, off: bool = False) -> Kind:
    """Milliseconds, written with a unit; shown in ``unit`` (the way the
    product states it, e.g. a grace of ``24h``) or the largest exact one.
    ``off``: ``0`` alone (no unit) is accepted, meaning off."""
    return Kind(
        "duration",
        parse_duration_or_off if off else parse_duration,
        show=lambda ms: format_duration(ms, unit),
    )


def failure_mode(check: Check) -> Kind:
    """``open`` or ``closed`` for one check: whether it is in ``fail_open``."""
    return Kind(
        "failure mode",
        parse_mode,
        show=lambda fail_open: "open" if check in fail_open else "closed",
        land=lambda fail_open, mode: fail_open | {check} if mode == "open" else fail_open - {check},
    )


TEXT = Kind("text", str)
PATH = Kind("path", Path)
INT = Kind("int", int)
BOOL = Kind("bool", parse_bool)
SWITCH = Kind("switch", parse_bool, switch=True)
LISTEN = Kind("address", parse_listen)
REDIS_URL = Kind("Redis URL", parse_redis_url, redact=redact_url)
METRICS_LISTEN = Kind("address or empty", parse_metrics_listen)
DURATIONS = Kind(
    "durations", parse_durations, show=lambda ms: ",".join(format_duration(x) for x in ms)
)
SHADOW = Kind(
    "checks",
    parse_shadow_checks,
    show=lambda checks: ",".join(sorted(c.value for c in checks)),
)
IDENTITIES = Kind(
    "names",
    parse_list,
    show=lambda names: ",".join(sorted(names)) or None,
    land=lambda _old, names: frozenset(names or ()),
    repeatable=True,
)


# -- the table ----------------------------------------------------------------------------

# The groups of settings: which commands have a row is which groups its parser
# is given (cli.build_parser calls add_<group>_flags). A parser records the
# groups whose rows land in Settings; settings_from builds from those only.
STORE = "store"  # serve, reconcile, events publish, release-plan
METRICS = "metrics"  # serve, reconcile
POLICY = "policy"  # serve, reconcile, release-plan
POLICY_R13 = "policy-r13"  # serve: R13 is the sidecar's answers only
SERVE = "serve"  # serve
RECONCILE = "reconcile"  # serve, reconcile, release-plan
CLIENT = "client"  # check, status, explain, preview, override, audit: the command reads them
DEBUG = "debug"  # every command: the command reads it
# The heading a group's flags have in --help (none: among the options).
_TITLES = {
    POLICY: "policy (SPEC rules)",
    POLICY_R13: "policy (SPEC rules)",
    SERVE: "sidecar",
    RECONCILE: "reconciler",
    CLIENT: "the sidecar to ask",
}
_DEFAULT = Settings()


@dataclass(frozen=True)
class Setting:
    """One row of :data:`SETTINGS`."""

    group: str
    flag: str
    """``--some-flag``; its environment variable is ``LCIC_GUARD_SOME_FLAG``."""
    field: str | None
    """Where it lands in the Settings tree (``policy.grace_ms``), which also
    holds its default; ``None``: read by the command itself (``default``)."""
    kind: Kind
    help: str
    help_embedded: str | None = None
    """The help in ``serve``, which starts its own Redis without --redis-url."""
    aliases: tuple[str, ...] = ()
    """Other names, before the flag in --help (argparse's attribute is the first)."""
    choices: tuple[str, ...] = ()
    at_least: int | None = None
    """The least value (an int), checked once the value is known."""
    default: str | None = None
    """The default of a flag with no field."""

    def __post_init__(self) -> None:
        if self.field is not None and self.default is not None:
            raise ValueError(f"{self.flag}: its default is its field's ({self.field})")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.lstrip("-").upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return (*self.aliases, self.flag)[0].lstrip("-").replace("-", "_")

    @property
    def default_text(self) -> str | None:
        """The default as the flag would take it; ``None``: none."""
        if self.field is None:
            return self.default
        value = field_value(_DEFAULT, self.field)
        return None if value is None else self.kind.show(value)


# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # Setting(group, flag, field it lands in (None: the command reads it), kind,
    #         help, options...), in --help's order within each group.
    Setting(STORE, "--redis-url", "redis_url", REDIS_URL,
            "Redis to use (redis://, rediss://, redis+sentinel://). Required",
            help_embedded="Redis to use (redis://, rediss://, redis+sentinel://). Without it, "
                          "a private redis-server is started and stopped with the process"),
    Setting(STORE, "--log-level", "log_level", TEXT,
            "log verbosity",
            choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Setting(STORE, "--log-format", "log_format", TEXT,
            "json: one JSON object a line (production); text: for a person; "
            "auto: text on a terminal, json otherwise",
            choices=("auto", "json", "text")),
    Setting(METRICS, "--metrics-listen", "metrics_listen", METRICS_LISTEN,
            "serve Prometheus metrics at http://HOST:PORT/metrics (empty: off; with "
            "--workers N, worker i (from 0) uses PORT+1+i)"),
    Setting(POLICY, "--grace", "policy.grace_ms", duration("h"),
            "R1: grace after an overdue alert, in ms or with a unit"),
    Setting(POLICY, "--release-after", "policy.release_after_ms", duration(),
            "R10: overdue suspension length before release"),
    Setting(POLICY, "--release-notice", "policy.release_notice_ms", duration(off=True),
            "R10: least time between an overdue suspension becoming known and the release "
            "(a backfilled history is not released sooner)"),
    Setting(POLICY, "--max-grace-extension", "policy.max_grace_extension_ms", duration(off=True),
            "how far past A + grace a grace_extended override may move the grace end "
            "(a later 'until' is cut to this)"),
    Setting(POLICY, "--overrun", "policy.overrun_ms", duration("m"),
            "R6: protection of a class past its scheduled end"),
    Setting(POLICY, "--max-class", "policy.max_class_ms", duration(),
            "R6: protection of a class with no scheduled end, from its start"),
    Setting(POLICY, "--protect-when-banned", "policy.protect_when_banned", BOOL,
            "R6: keep classes in progress running after a compliance ban"),
    Setting(POLICY_R13, "--stale-bound", "policy.stale_bound_ms", duration(),
            "R13: how old a last-seen status may be and still answer"),
    *(Setting(POLICY_R13, f"--failure-mode-{check.value}", "policy.fail_open",
              failure_mode(check),
              f"R13: answer to {check.value} checks when no usable status exists "
              "(open = allow, closed = deny)")
      for check in Check),
    Setting(SERVE, "--listen", "listen", LISTEN,
            "gRPC listen address, HOST:PORT"),
    Setting(SERVE, "--redis-timeout", "redis_timeout_ms", duration(),
            "deprecated: a lower bound of --store-down-after, kept so that existing "
            "configurations start (checks no longer answer without Redis before it is down)"),
    Setting(SERVE, "--store-down-after", "store_down_ms", duration(),
            "R13: Redis counts as down when it has answered no read for this long (a "
            "refused or reset connection, or an open circuit breaker, counts at once); only "
            "then does a check answer without it, from the last status seen or by its failure "
            "mode. A slow Redis or a large CheckBatch is waited for"),
    Setting(SERVE, "--max-watch-streams", "max_watch_streams", INT,
            "WatchApplicationStatus streams open at once per process; more are refused "
            "with RESOURCE_EXHAUSTED",
            at_least=1),
    Setting(SERVE, "--insecure", "insecure", BOOL,
            "allow listening on a non-loopback address without --auth-token-file or mutual "
            "TLS (anyone who reaches the port can then report classes and read statuses)"),
    Setting(SERVE, "--cache-size", "cache_size", INT,
            "applications kept in each process's status cache (LRU)",
            at_least=1),
    Setting(SERVE, "--cache-max-age", "cache_max_age_ms", duration("s"),
            "longest a feed shard is trusted without a progress mark (the reconcilers write "
            "one each second): past it, checks of its applications read Redis"),
    Setting(SERVE, "--workers", "workers", INT,
            "serving processes sharing the listen port (SO_REUSEPORT among them only: "
            "a port another program holds is refused)",
            at_least=1),
    Setting(SERVE, "--tls-cert", "tls_cert", TEXT,
            "server certificate (PEM); with --tls-key enables TLS"),
    Setting(SERVE, "--tls-key", "tls_key", TEXT,
            "server private key (PEM)"),
    Setting(SERVE, "--shadow", "shadow", SHADOW,
            "checks in shadow mode, e.g. create,enter,recording or all: always allowed, "
            "what would be denied is logged and counted"),
    Setting(SERVE, "--tls-client-ca", "tls_client_ca", TEXT,
            "CA (PEM) that client certificates must chain to; enables mutual TLS"),
    Setting(SERVE, "--auth-token-file", "auth_token_file", TEXT,
            "file of bearer tokens, one a line as NAME:SCOPES:TOKEN (NAME is the actor "
            "audit shows) or TOKEN [SCOPES], any of which lets a caller use the RPCs that "
            "change or reveal state (reports, status, watch); read again when it changes"),
    Setting(SERVE, "--auth-allow-identity", "auth_allow_identities", IDENTITIES,
            "client certificate identity allowed to use the RPCs that change or reveal "
            "state, NAME or NAME=SCOPE+SCOPE: a DNS subject alternative name, or the common "
            "name of a certificate with none (mutual TLS); repeatable or comma-separated"),
    Setting(SERVE, "--auth-checks", "auth_checks", BOOL,
            "require the same authentication for the checks too"),
    Setting(SERVE, "--max-heartbeat-age", "max_heartbeat_age_ms", duration(off=True),
            "health turns NOT_SERVING when the reconciler's heartbeat is older than this "
            "(0 disables)"),
    Setting(SERVE, "--shutdown-delay", "shutdown_delay_ms", duration(off=True),
            "on SIGTERM, how long health says NOT_SERVING while still answering, "
            "before the port closes"),
    Setting(SERVE, "--shutdown-grace", "shutdown_grace_ms", duration(),
            "on SIGTERM, how long in-flight calls may take to finish after the port closes"),
    Setting(RECONCILE, "--events", "events", PATH,
            "file of billing events (one JSON object a line) applied at start",
            help_embedded="file of billing events (one JSON object a line) applied at start; "
                          "without --redis-url, built-in sample data"),
    Setting(RECONCILE, "--release-margin", "reconciler.release_margin_ms", duration(),
            "R10: how far past release_at the feed must be confirmed read"),
    Setting(RECONCILE, "--release-dry-run", "reconciler.release_dry_run", BOOL,
            "log releases that fall due instead of performing them"),
    Setting(RECONCILE, "--release-reminders", "reconciler.release_reminders_ms", DURATIONS,
            "R10: when before release_at to announce release_scheduled again (after the "
            "first notice; only reminders still ahead of it; off for none)"),
    Setting(RECONCILE, "--suspension-reminders", "reconciler.suspension_reminders_ms", DURATIONS,
            "when before a scheduled suspension to announce suspension_scheduled again "
            "(after the first warning; only reminders still ahead of it; off for none)"),
    Setting(RECONCILE, "--announce-settle", "reconciler.announce_settle_ms", duration(off=True),
            "how long a new state must hold before status_changed announces it (a state "
            "passed through sooner is not announced)"),
    Setting(RECONCILE, "--batch-size", "reconciler.batch_size", INT,
            "billing events applied per round"),
    Setting(RECONCILE, "--claim-idle", "reconciler.claim_idle_ms", duration(),
            "how long a billing-stream entry may stay unacknowledged by a consumer "
            "before another replica claims it (its consumer is presumed dead)"),
    Setting(RECONCILE, "--deadletter-maxlen", "reconciler.deadletter_maxlen", INT,
            "about how many entries the dead-letter stream keeps (approximate MAXLEN; "
            "0 keeps all)",
            at_least=0),
    Setting(RECONCILE, "--parked-ttl", "reconciler.parked_ttl_ms", duration(off=True),
            "how long facts about an application never registered are kept, from the "
            "last one parked (0 keeps them for ever)"),
    Setting(RECONCILE, "--ledger-retention", "reconciler.ledger_retention_ms", duration(off=True),
            "how long after its last date a release notice or suspension warning of an "
            "episode that is over stays in the account's ledger, and about how long an "
            "announcement stays on lcic:guard:events (0 keeps them for ever)"),
    Setting(CLIENT, "--target", None, TEXT,
            "sidecar address",
            default=_DEFAULT.listen),
    Setting(CLIENT, "--token-file", None, TEXT,
            "file whose first line is the bearer token to send, alone or as a line of the "
            "sidecar's token file (a sidecar run with --auth-token-file wants one for status, "
            "explain, preview, override and audit)"),
    # Their variables are LCIC_GUARD_CLIENT_TLS_*: LCIC_GUARD_TLS_CERT/KEY are
    # serve's own certificate, and one environment often holds both.
    Setting(CLIENT, "--client-tls-ca", None, TEXT,
            "CA (PEM) the sidecar's certificate must chain to; enables TLS (also --tls-ca)",
            aliases=("--tls-ca",)),
    Setting(CLIENT, "--client-tls-cert", None, TEXT,
            "client certificate (PEM) for mutual TLS; with --client-tls-key and "
            "--client-tls-ca (also --tls-cert)",
            aliases=("--tls-cert",)),
    Setting(CLIENT, "--client-tls-key", None, TEXT,
            "client private key (PEM) (also --tls-key)",
            aliases=("--tls-key",)),
    Setting(DEBUG, "--debug", None, SWITCH,
            "on a failure, print its traceback too",
            default="False"),
)
# fmt: on

INTERNAL: frozenset[str] = frozenset(
    {"consume_stream", "reconciler.block_ms", "reconciler.lease_ttl_ms", "reconciler.tick_ms"}
)
"""The fields of the Settings tree no flag sets: for programs that embed the
sidecar or the reconciler, and for tests."""


# -- the Settings tree --------------------------------------------------------------------


def field_value(settings: Any, path: str) -> Any:
    """The value at ``path`` (``policy.grace_ms``) in a Settings tree."""
    for name in path.split("."):
        settings = getattr(settings, name)
    return settings


def _with(settings: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if rest:
        value = _with(getattr(settings, head), rest, value)
    return replace(settings, **{head: value})


# -- flags from the table -----------------------------------------------------------------

_GROUPS = "settings_groups"


class _EnvDefault(argparse.Action):
    """A row's flag: takes its default from the row's variable when set (shown
    in --help), else from the row."""

    def __init__(
        self,
        option_strings: list[str],
        dest: str,
        *,
        setting: Setting,
        meaning: str,
        **kwargs: Any,
    ) -> None:
        self.setting = setting
        kind = setting.kind
        env_value = os.environ.get(setting.env)
        default: Any = setting.default_text
        if env_value is not None:
            try:
                default = kind.parse(env_value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise SystemExit(f"{setting.env}: {exc}") from None
        if kind.parse is parse_bool:
            # The flag alone means true; ``--flag false`` still turns it off.
            kwargs.update(nargs="?", const=True, metavar="true|false")
            meaning = f"{meaning} (the flag alone means true)"
        self.meaning = meaning
        """The help without the variable and the default (the doc's column)."""
        shown = "%(default)s"
        if kind.redact is not None:  # a secret may be in the default (from the environment)
            shown = str(kind.redact(default)).replace("%", "%%")
        super().__init__(
            option_strings,
            dest,
            type=kind.parse,
            default=default,
            choices=setting.choices or None,
            help=f"{meaning} [env {setting.env}; default: {shown}]",
            **kwargs,
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


class _EnvAppend(_EnvDefault):
    """A repeatable flag whose values are lists; the first use on the command
    line replaces the environment's value, later ones add to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen = f"_{self.dest}_given"
        current = getattr(namespace, self.dest, ()) if getattr(namespace, seen, False) else ()
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, (*current, *values))


class _EnvSwitch(argparse.Action):
    """A flag alone (``--debug``), also on when its variable says true; a
    variable it does not understand leaves it off."""

    def __init__(
        self, option_strings: list[str], dest: str, *, setting: Setting, meaning: str
    ) -> None:
        self.setting = setting
        self.meaning = meaning
        env_value = os.environ.get(setting.env)
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=env_value is not None
            and env_value.strip().lower() in ("1", "true", "yes", "on"),
            help=f"{meaning} [env {setting.env}]",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)


def _add(
    p: argparse.ArgumentParser, *groups: str, embedded: bool = False, dest: str | None = None
) -> None:
    """Add the rows of ``groups`` to a command's parser, in the table's order."""
    rows = [row for row in SETTINGS if row.group in groups]
    lands = frozenset(row.group for row in rows if row.field is not None)
    if lands:
        p.set_defaults(**{_GROUPS: frozenset(p.get_default(_GROUPS) or ()) | lands})
    headings: dict[str, argparse._ArgumentGroup] = {}
    for row in rows:
        target: argparse._ActionsContainer = p
        title = _TITLES.get(row.group)
        if title is not None:
            if title not in headings:
                headings[title] = p.add_argument_group(title)
            target = headings[title]
        action: type[argparse.Action] = _EnvDefault
        if row.kind.switch:
            action = _EnvSwitch
        elif row.kind.repeatable:
            action = _EnvAppend
        target.add_argument(
            *row.aliases,
            row.flag,
            action=action,
            dest=dest or row.dest,
            setting=row,
            meaning=(row.help_embedded if embedded else None) or row.help,
        )


def groups_of(ns: argparse.Namespace) -> frozenset[str]:
    """The groups of settings flags the parsed command has."""
    return frozenset(getattr(ns, _GROUPS, None) or ())


def documented(p: argparse.ArgumentParser) -> Iterator[tuple[Setting, str]]:
    """Each row a command's parser has, in its --help order, with its help as
    that command gives it."""
    for action in p._actions:
        if isinstance(action, (_EnvDefault, _EnvSwitch)):
            yield action.setting, action.meaning


def add_store_flags(p: argparse.ArgumentParser, *, embedded: bool = False) -> None:
    _add(p, STORE, embedded=embedded)


def add_debug_flag(p: argparse.ArgumentParser, dest: str = "debug") -> None:
    _add(p, DEBUG, dest=dest)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """How a command reaches a running sidecar (check, status, explain, preview)."""
    _add(p, CLIENT)


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    _add(p, METRICS)


def add_policy_flags(p: argparse.ArgumentParser, *, sidecar: bool = True) -> None:
    """The policy's flags; those only the sidecar's answers use (R13) are left
    out of the reconciler's commands (``sidecar=False``)."""
    if sidecar:
        _add(p, POLICY, POLICY_R13)
    else:
        _add(p, POLICY)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    _add(p, SERVE)


def add_reconcile_flags(p: argparse.ArgumentParser, *, embedded: bool) -> None:
    _add(p, RECONCILE, embedded=embedded)


# -- Settings from a parsed command -------------------------------------------------------


def settings_from(ns: argparse.Namespace) -> Settings:
    """Build :class:`Settings` from a parsed command: the rows its parser has
    set their fields; the rest keep their defaults. Then the checks of values
    that only make sense together."""
    groups = groups_of(ns)
    rows = [(row, row.field) for row in SETTINGS if row.group in groups and row.field]
    s = _DEFAULT
    for row, path in rows:
        s = _with(s, path, row.kind.land(field_value(s, path), getattr(ns, row.dest)))
    for row, path in rows:
        least = row.at_least
        if least is not None and field_value(s, path) < least:
            raise SystemExit(
                f"{row.flag} must be " + (f"at least {least}" if least else "0 or more")
            )
    if SERVE in groups:
        _check_serve(s)
    return s


def _check_serve(s: Settings) -> None:
    if s.auth_checks and not (s.auth_token_file or s.auth_allow_identities):
        raise SystemExit("--auth-checks needs --auth-token-file or --auth-allow-identity")
    if s.auth_allow_identities and not s.tls_client_ca:
        raise SystemExit("--auth-allow-identity needs mutual TLS (--tls-client-ca)")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    retired = retired_tls_variable(serving=True)
    if retired is not None:
        raise SystemExit(retired)
    if s.auth_token_file:  # a bad line is one line now, not a failure after Redis started
        try:
            read_token_file(s.auth_token_file)
        except ValueError as exc:
            raise SystemExit(f"--auth-token-file {exc}") from None
    for entry in sorted(s.auth_allow_identities):
        try:
            parse_identity(entry)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    refuse_open_listen(s)


RETIRED_CLIENT_TLS_CA = ENV_PREFIX + "TLS_CA"


def retired_tls_variable(*, serving: bool) -> str | None:
    """Why a client command (or, ``serving``, serve with its certificate from
    the environment) must not run here: the environment holds
    LCIC_GUARD_TLS_CA, which only client commands ever read, so its
    LCIC_GUARD_TLS_CERT/KEY, which meant the client's certificate to them and
    the server's to serve, may well be a client's. Rather than guess, both
    refuse until the client's variables are renamed."""
    if RETIRED_CLIENT_TLS_CA not in os.environ:
        return None
    if serving and ENV_PREFIX + "TLS_CERT" not in os.environ:
        return None
    return (
        f"{RETIRED_CLIENT_TLS_CA} is no longer read: client commands take "
        f"{ENV_PREFIX}CLIENT_TLS_CA, {ENV_PREFIX}CLIENT_TLS_CERT and "
        f"{ENV_PREFIX}CLIENT_TLS_KEY, while {ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY "
        f"are serve's own certificate; rename the client's variables and unset "
        f"{RETIRED_CLIENT_TLS_CA}"
    )


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` (or a unix socket) is reachable from this machine only."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or 0.0.0.0 / [::]: assume the network can reach it


def refuse_open_listen(s: Settings) -> None:
    """Secure by default: no network-reachable port without authentication."""
    authenticated = bool(s.auth_token_file) or bool(s.tls_client_ca and s.tls_cert)
    if authenticated or s.insecure or is_loopback(s.listen):
        return
    sys.stderr.write(
        f"lcic-guard: refusing to listen on {s.listen} without authentication: give "
        "--auth-token-file or mutual TLS (--tls-cert, --tls-key, --tls-client-ca), or "
        "--insecure to accept anyone who can reach the port\n"
    )
    raise SystemExit(2)
