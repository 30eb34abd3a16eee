"""Command-line flags and the environment, turned into :class:`lcic_guard.config.Settings`.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

from lcic_guard import metrics
from lcic_guard.config import Settings
from lcic_guard.domain.policy import (
    DURATION_UNITS,
    Check,
    PolicyConfig,
    format_duration,
)
from lcic_guard.redact import redact_url
from lcic_guard.sidecar.identities import parse_identity, read_token_file

ENV_PREFIX = "LCIC_GUARD_"
_UNITS = DURATION_UNITS
_PART = r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)"
_DURATION = re.compile(rf"\s*(?:{_PART}\s*)+")
_PARTS = re.compile(_PART)


def parse_duration(text: str) -> int:
    """Parse a duration such as ``24h`` or ``1h30m`` into milliseconds."""
    if not _DURATION.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), "
            "e.g. 24h or 1h30m"
        )
    return sum(int(float(n) * _UNITS[unit]) for n, unit in _PARTS.findall(text))


# The flags' defaults come from here, so that each is written once (in config).
_DEFAULT = Settings()
_POLICY = _DEFAULT.policy
_RECONCILER = _DEFAULT.reconciler


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


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"))


class _EnvDefault(argparse.Action):
    """Takes its default from LCIC_GUARD_<FLAG> when set (shown in --help)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        flag = option_strings[-1].lstrip("-")
        env_value = _env(flag)
        conv = kwargs.get("type") or str
        if env_value is not None:
            try:
                kwargs["default"] = conv(env_value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise SystemExit(f"{ENV_PREFIX}{flag.upper().replace('-', '_')}: {exc}") from None
            kwargs["required"] = False
        env_name = ENV_PREFIX + flag.upper().replace("-", "_")
        if conv is parse_bool:
            # The flag alone means true; ``--flag false`` still turns it off.
            kwargs.setdefault("nargs", "?")
            kwargs.setdefault("const", True)
            kwargs["metavar"] = "true|false"
            kwargs["help"] = f"{kwargs.get('help', '')} (the flag alone means true)"
        shown = "%(default)s"
        redact = kwargs.pop("redact", None)
        if redact is not None:  # a secret may be in the default (from the environment)
            shown = str(redact(kwargs.get("default"))).replace("%", "%%")
        kwargs["help"] = f"{kwargs.get('help', '')} [env {env_name}; default: {shown}]"
        super().__init__(option_strings, dest, **kwargs)

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


def parse_durations(text: str) -> tuple[int, ...]:
    """``30d,7d,1d`` into milliseconds; empty or ``off`` for none."""
    if text.strip().lower() in ("", "off", "none"):
        return ()
    return tuple(parse_duration(x) for x in text.split(",") if x.strip())


def parse_list(text: str) -> tuple[str, ...]:
    """``a,b, c`` into ``("a", "b", "c")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


# The groups of settings flags a command's parser has, recorded on the parser
# (and so on the parsed namespace): settings_from builds from these only.
STORE, METRICS, POLICY, POLICY_R13, SERVE, RECONCILE = (
    "store",
    "metrics",
    "policy",
    "policy-r13",
    "serve",
    "reconcile",
)
_GROUPS = "settings_groups"


def _has(p: argparse.ArgumentParser, group: str) -> None:
    p.set_defaults(**{_GROUPS: frozenset(p.get_default(_GROUPS) or ()) | {group}})


def groups_of(ns: argparse.Namespace) -> frozenset[str]:
    """The groups of settings flags the parsed command has."""
    return frozenset(getattr(ns, _GROUPS, None) or ())


def add_store_flags(p: argparse.ArgumentParser, *, embedded: bool = False) -> None:
    _has(p, STORE)
    p.add_argument(
        "--redis-url",
        action=_EnvDefault,
        type=parse_redis_url,
        default=None,
        redact=redact_url,
        help="Redis to use (redis://, rediss://, redis+sentinel://). "
        + (
            "Without it, a private redis-server is started and stopped with the process"
            if embedded
            else "Required"
        ),
    )
    p.add_argument(
        "--log-level",
        action=_EnvDefault,
        default=_DEFAULT.log_level,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity",
    )
    p.add_argument(
        "--log-format",
        action=_EnvDefault,
        default=_DEFAULT.log_format,
        choices=["auto", "json", "text"],
        help="json: one JSON object a line (production); text: for a person; "
        "auto: text on a terminal, json otherwise",
    )


def add_debug_flag(p: argparse.ArgumentParser, dest: str = "debug") -> None:
    env = _env("debug")
    p.add_argument(
        "--debug",
        dest=dest,
        action="store_true",
        default=env is not None and env.strip().lower() in ("1", "true", "yes", "on"),
        help="on a failure, print its traceback too [env LCIC_GUARD_DEBUG]",
    )


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """How a command reaches a running sidecar (check, status, explain, preview)."""
    g = p.add_argument_group("the sidecar to ask")
    g.add_argument("--target", action=_EnvDefault, default=_DEFAULT.listen, help="sidecar address")
    g.add_argument(
        "--token-file",
        action=_EnvDefault,
        default=None,
        help="file whose first line is the bearer token to send, alone or as a line of the "
        "sidecar's token file (a sidecar run with --auth-token-file wants one for status, "
        "explain, preview, override and audit)",
    )
    # Their variables are LCIC_GUARD_CLIENT_TLS_*: LCIC_GUARD_TLS_CERT/KEY are
    # serve's own certificate, and one environment often holds both.
    g.add_argument(
        "--tls-ca",
        "--client-tls-ca",
        action=_EnvDefault,
        default=None,
        help="CA (PEM) the sidecar's certificate must chain to; enables TLS (also --tls-ca)",
    )
    g.add_argument(
        "--tls-cert",
        "--client-tls-cert",
        action=_EnvDefault,
        default=None,
        help="client certificate (PEM) for mutual TLS; with --client-tls-key and "
        "--client-tls-ca (also --tls-cert)",
    )
    g.add_argument(
        "--tls-key",
        "--client-tls-key",
        action=_EnvDefault,
        default=None,
        help="client private key (PEM) (also --tls-key)",
    )


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


def add_metrics_flags(p: argparse.ArgumentParser) -> None:
    _has(p, METRICS)
    p.add_argument(
        "--metrics-listen",
        action=_EnvDefault,
        type=parse_metrics_listen,
        default=_DEFAULT.metrics_listen,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (empty: off; with "
        "--workers N, worker i (from 0) uses PORT+1+i)",
    )


def add_policy_flags(p: argparse.ArgumentParser, *, sidecar: bool = True) -> None:
    """The policy's flags; those only the sidecar's answers use (R13) are left
    out of the reconciler's commands (``sidecar=False``)."""
    _has(p, POLICY)
    g = p.add_argument_group("policy (SPEC rules)")
    g.add_argument(
        "--grace",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_POLICY.grace_ms, "h"),
        help="R1: grace after an overdue alert, in ms or with a unit",
    )
    g.add_argument(
        "--release-after",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_POLICY.release_after_ms),
        help="R10: overdue suspension length before release",
    )
    g.add_argument(
        "--release-notice",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_POLICY.release_notice_ms),
        help="R10: least time between an overdue suspension becoming known and the release "
        "(a backfilled history is not released sooner)",
    )
    g.add_argument(
        "--max-grace-extension",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_POLICY.max_grace_extension_ms),
        help="how far past A + grace a grace_extended override may move the grace end "
        "(a later 'until' is cut to this)",
    )
    g.add_argument(
        "--overrun",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_POLICY.overrun_ms, "m"),
        help="R6: protection of a class past its scheduled end",
    )
    g.add_argument(
        "--max-class",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_POLICY.max_class_ms),
        help="R6: protection of a class with no scheduled end, from its start",
    )
    g.add_argument(
        "--protect-when-banned",
        action=_EnvDefault,
        type=parse_bool,
        default=_POLICY.protect_when_banned,
        help="R6: keep classes in progress running after a compliance ban",
    )
    if not sidecar:
        return
    _has(p, POLICY_R13)
    g.add_argument(
        "--stale-bound",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_POLICY.stale_bound_ms),
        help="R13: how old a last-seen status may be and still answer",
    )
    for check in Check:
        g.add_argument(
            f"--failure-mode-{check.value}",
            action=_EnvDefault,
            type=parse_mode,
            default="open" if check in _POLICY.fail_open else "closed",
            help=f"R13: answer to {check.value} checks when no usable status "
            "exists (open = allow, closed = deny)",
        )


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    _has(p, SERVE)
    g = p.add_argument_group("sidecar")
    g.add_argument(
        "--listen",
        action=_EnvDefault,
        type=parse_listen,
        default=_DEFAULT.listen,
        help="gRPC listen address, HOST:PORT",
    )
    g.add_argument(
        "--redis-timeout",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_DEFAULT.redis_timeout_ms),
        help="deprecated: a lower bound of --store-down-after, kept so that existing "
        "configurations start (checks no longer answer without Redis before it is down)",
    )
    g.add_argument(
        "--store-down-after",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_DEFAULT.store_down_ms),
        help="R13: Redis counts as down when it has answered no read for this long (a "
        "refused or reset connection, or an open circuit breaker, counts at once); only "
        "then does a check answer without it, from the last status seen or by its failure "
        "mode. A slow Redis or a large CheckBatch is waited for",
    )
    g.add_argument(
        "--max-watch-streams",
        action=_EnvDefault,
        type=int,
        default=_DEFAULT.max_watch_streams,
        help="WatchApplicationStatus streams open at once per process; more are refused "
        "with RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--insecure",
        action=_EnvDefault,
        type=parse_bool,
        default=_DEFAULT.insecure,
        help="allow listening on a non-loopback address without --auth-token-file or mutual "
        "TLS (anyone who reaches the port can then report classes and read statuses)",
    )
    g.add_argument(
        "--cache-size",
        action=_EnvDefault,
        type=int,
        default=_DEFAULT.cache_size,
        help="applications kept in each process's status cache (LRU)",
    )
    g.add_argument(
        "--cache-max-age",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_DEFAULT.cache_max_age_ms, "s"),
        help="longest a cached status is used before it is read again, even with the "
        "change feed healthy (held statuses are re-read in the background within half of "
        "it, so checks need not)",
    )
    g.add_argument(
        "--workers",
        action=_EnvDefault,
        type=int,
        default=_DEFAULT.workers,
        help="serving processes sharing the listen port (SO_REUSEPORT among them only: "
        "a port another program holds is refused)",
    )
    g.add_argument(
        "--tls-cert",
        action=_EnvDefault,
        default=None,
        help="server certificate (PEM); with --tls-key enables TLS",
    )
    g.add_argument("--tls-key", action=_EnvDefault, default=None, help="server private key (PEM)")
    g.add_argument(
        "--shadow",
        action=_EnvDefault,
        type=parse_shadow_checks,
        default=",".join(sorted(c.value for c in _DEFAULT.shadow)),
        help="checks in shadow mode, e.g. create,enter,recording or all: always allowed, "
        "what would be denied is logged and counted",
    )
    g.add_argument(
        "--tls-client-ca",
        action=_EnvDefault,
        default=None,
        help="CA (PEM) that client certificates must chain to; enables mutual TLS",
    )
    g.add_argument(
        "--auth-token-file",
        action=_EnvDefault,
        default=None,
        help="file of bearer tokens, one a line as NAME:SCOPES:TOKEN (NAME is the actor "
        "audit shows) or TOKEN [SCOPES], any of which lets a caller use the RPCs that "
        "change or reveal state (reports, status, watch); read again when it changes",
    )
    g.add_argument(
        "--auth-allow-identity",
        action=_EnvAppend,
        type=parse_list,
        default=None,
        help="client certificate identity allowed to use the RPCs that change or reveal "
        "state, NAME or NAME=SCOPE+SCOPE: a DNS subject alternative name, or the common "
        "name of a certificate with none (mutual TLS); repeatable or comma-separated",
    )
    g.add_argument(
        "--auth-checks",
        action=_EnvDefault,
        type=parse_bool,
        default=_DEFAULT.auth_checks,
        help="require the same authentication for the checks too",
    )
    g.add_argument(
        "--max-heartbeat-age",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_DEFAULT.max_heartbeat_age_ms),
        help="health turns NOT_SERVING when the reconciler's heartbeat is older than this "
        "(0 disables)",
    )
    g.add_argument(
        "--shutdown-delay",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_DEFAULT.shutdown_delay_ms),
        help="on SIGTERM, how long health says NOT_SERVING while still answering, "
        "before the port closes",
    )
    g.add_argument(
        "--shutdown-grace",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_DEFAULT.shutdown_grace_ms),
        help="on SIGTERM, how long in-flight calls may take to finish after the port closes",
    )


def add_reconcile_flags(p: argparse.ArgumentParser, *, embedded: bool) -> None:
    _has(p, RECONCILE)
    g = p.add_argument_group("reconciler")
    g.add_argument(
        "--events",
        action=_EnvDefault,
        type=Path,
        default=None,
        help="file of billing events (one JSON object a line) applied at start"
        + ("; without --redis-url, built-in sample data" if embedded else ""),
    )
    g.add_argument(
        "--release-margin",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_RECONCILER.release_margin_ms),
        help="R10: how far past release_at the feed must be confirmed read",
    )
    g.add_argument(
        "--release-dry-run",
        action=_EnvDefault,
        type=parse_bool,
        default=_RECONCILER.release_dry_run,
        help="log releases that fall due instead of performing them",
    )
    g.add_argument(
        "--release-reminders",
        action=_EnvDefault,
        type=parse_durations,
        default=",".join(format_duration(ms) for ms in _RECONCILER.release_reminders_ms),
        help="R10: when before release_at to announce release_scheduled again (after the "
        "first notice; only reminders still ahead of it; off for none)",
    )
    g.add_argument(
        "--suspension-reminders",
        action=_EnvDefault,
        type=parse_durations,
        default=",".join(format_duration(ms) for ms in _RECONCILER.suspension_reminders_ms),
        help="when before a scheduled suspension to announce suspension_scheduled again "
        "(after the first warning; only reminders still ahead of it; off for none)",
    )
    g.add_argument(
        "--announce-settle",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_RECONCILER.announce_settle_ms),
        help="how long a new state must hold before status_changed announces it (a state "
        "passed through sooner is not announced)",
    )
    g.add_argument(
        "--batch-size",
        action=_EnvDefault,
        type=int,
        default=_RECONCILER.batch_size,
        help="billing events applied per round",
    )
    g.add_argument(
        "--claim-idle",
        action=_EnvDefault,
        type=parse_duration,
        default=format_duration(_RECONCILER.claim_idle_ms),
        help="how long a billing-stream entry may stay unacknowledged by a consumer "
        "before another replica claims it (its consumer is presumed dead)",
    )
    g.add_argument(
        "--deadletter-maxlen",
        action=_EnvDefault,
        type=int,
        default=_RECONCILER.deadletter_maxlen,
        help="about how many entries the dead-letter stream keeps (approximate MAXLEN; "
        "0 keeps all)",
    )
    g.add_argument(
        "--parked-ttl",
        action=_EnvDefault,
        type=parse_duration_or_off,
        default=format_duration(_RECONCILER.parked_ttl_ms),
        help="how long facts about an application never registered are kept, from the "
        "last one parked (0 keeps them for ever)",
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


def _policy(ns: argparse.Namespace, groups: frozenset[str]) -> PolicyConfig:
    policy = replace(
        _POLICY,
        grace_ms=ns.grace,
        release_after_ms=ns.release_after,
        release_notice_ms=ns.release_notice,
        max_grace_extension_ms=ns.max_grace_extension,
        overrun_ms=ns.overrun,
        max_class_ms=ns.max_class,
        protect_when_banned=ns.protect_when_banned,
    )
    if POLICY_R13 not in groups:  # the reconciler's commands: R13 is the sidecar's
        return policy
    return replace(
        policy,
        stale_bound_ms=ns.stale_bound,
        fail_open=frozenset(c for c in Check if getattr(ns, f"failure_mode_{c.value}") == "open"),
    )


def _serve(s: Settings, ns: argparse.Namespace) -> Settings:
    s = replace(
        s,
        listen=ns.listen,
        redis_timeout_ms=ns.redis_timeout,
        cache_size=ns.cache_size,
        cache_max_age_ms=ns.cache_max_age,
        workers=ns.workers,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        shadow=frozenset(ns.shadow),
        auth_token_file=ns.auth_token_file,
        auth_allow_identities=frozenset(ns.auth_allow_identity or ()),
        auth_checks=ns.auth_checks,
        max_heartbeat_age_ms=ns.max_heartbeat_age,
        shutdown_delay_ms=ns.shutdown_delay,
        shutdown_grace_ms=ns.shutdown_grace,
        store_down_ms=ns.store_down_after,
        max_watch_streams=ns.max_watch_streams,
        insecure=ns.insecure,
    )
    if s.workers < 1 or s.cache_size < 1:
        raise SystemExit("--workers and --cache-size must be at least 1")
    if s.max_watch_streams < 1:
        raise SystemExit("--max-watch-streams must be at least 1")
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
    return s


def _reconcile(s: Settings, ns: argparse.Namespace) -> Settings:
    s = replace(
        s,
        events=ns.events,
        reconciler=replace(
            _RECONCILER,
            batch_size=ns.batch_size,
            release_margin_ms=ns.release_margin,
            release_dry_run=ns.release_dry_run,
            claim_idle_ms=ns.claim_idle,
            release_reminders_ms=ns.release_reminders,
            suspension_reminders_ms=ns.suspension_reminders,
            announce_settle_ms=ns.announce_settle,
            deadletter_maxlen=ns.deadletter_maxlen,
            parked_ttl_ms=ns.parked_ttl,
        ),
    )
    if s.reconciler.deadletter_maxlen < 0:
        raise SystemExit("--deadletter-maxlen must be 0 or more")
    return s


def settings_from(ns: argparse.Namespace) -> Settings:
    """Build :class:`Settings` from a parsed command: the groups of flags its
    parser has set their settings; the rest keep their defaults."""
    groups = groups_of(ns)
    s = _DEFAULT
    if STORE in groups:
        s = replace(s, redis_url=ns.redis_url, log_level=ns.log_level, log_format=ns.log_format)
    if METRICS in groups:
        s = replace(s, metrics_listen=ns.metrics_listen)
    if POLICY in groups:
        s = replace(s, policy=_policy(ns, groups))
    if SERVE in groups:
        s = _serve(s, ns)
    if RECONCILE in groups:
        s = _reconcile(s, ns)
    return s
