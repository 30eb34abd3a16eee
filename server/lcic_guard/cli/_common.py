"""What the commands share: reaching a sidecar (target, TLS, token) through
the client, the one line for each failure, and the exit statuses."""

from __future__ import annotations

import argparse
import datetime
import functools
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lcic_guard import render
from lcic_guard.config import Settings
from lcic_guard.demo import RedisServerMissing
from lcic_guard.domain.time import Millis
from lcic_guard.errors import CommandError, readable_text_file
from lcic_guard.flags import add_client_flags, add_debug_flag, retired_tls_variable, settings_from
from lcic_guard.logs import redact_url
from lcic_guard.sidecar.identities import token_to_send
from lcic_guard.store.connect import StoreError

if TYPE_CHECKING:
    # Imported when a command runs: the client imports grpc (see main()).
    from lcic_guard_client import GuardClient, GuardError

EXIT_CODES: Final = """\
exit status:
  0  done; for check and explain: the check is allowed
  1  check, explain: the check is denied (a normal answer);
     events publish: some lines are invalid
  2  a usage error, or a failure the one-line message explains (an address,
     a file, Redis or the sidecar that cannot be reached); --debug adds the
     traceback
  3  an unexpected error (rerun with --debug for the traceback)
"""

USAGE: Final = 2
"""Exit status of a usage error or a failure the one-line message explains."""
UNEXPECTED: Final = 3
INTERRUPTED: Final = 130  # as a shell reports a command ended by Ctrl-C
BROKEN_PIPE: Final = 141

Command = Callable[[argparse.Namespace], int]


# -- failures -----------------------------------------------------------------------


def failure(exc: Exception, args: argparse.Namespace) -> tuple[str, int]:
    """The one line for a command's failure, and its exit status."""
    if isinstance(exc, CommandError | RedisServerMissing):
        return str(exc), USAGE
    if isinstance(exc, StoreError):
        url = redact_url(getattr(args, "redis_url", None) or "")
        return f"Redis {url} failed: {type(exc).__name__}: {exc}", USAGE
    text = f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
    return text, UNEXPECTED


def sidecar_error(exc: GuardError, target: str, token_file: str | None = None) -> CommandError:
    """A failed call as the line that says what to do about it."""
    code, details = exc.code, exc.details
    low = details.lower()
    if code == "UNAVAILABLE" and (
        "failed to connect" in low or "dns resolution" in low or "connection refused" in low
    ):
        if "handshake" in low or "ssl" in low or "tls" in low:
            return CommandError(
                f"cannot reach the sidecar at {target} over TLS (the handshake failed); "
                "check --tls-ca, --tls-cert and --tls-key, or leave them out for a sidecar "
                "without TLS"
            )
        return CommandError(
            f"cannot reach the sidecar at {target} — is `lcic-guard serve` running? "
            "(--target or LCIC_GUARD_TARGET names it)"
        )
    if code == "UNAUTHENTICATED":
        if token_file:
            return CommandError(
                f"the sidecar at {target} refused the token in {token_file} ({details}); "
                "is it one of the sidecar's --auth-token-file tokens?"
            )
        return CommandError(
            f"the sidecar at {target} wants a bearer token ({details}); pass --token-file "
            "(or LCIC_GUARD_TOKEN_FILE)"
        )
    if code == "PERMISSION_DENIED":
        return CommandError(f"the sidecar at {target} refused the call: {details}")
    if code == "DEADLINE_EXCEEDED":
        return CommandError(
            f"the sidecar at {target} did not answer in time; is the address right, and is "
            "it running and not overloaded?"
        )
    if code in ("INVALID_ARGUMENT", "NOT_FOUND"):
        return CommandError(details)
    return CommandError(f"the sidecar at {target} answered {code}: {details}")


# -- commands on a sidecar ----------------------------------------------------------


def client_command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of a command that asks a running sidecar."""
    if "description" in kwargs:  # kept as written (for the exit codes): wrap it here
        kwargs["description"] = textwrap.fill(kwargs["description"], 79)
    p: argparse.ArgumentParser = sub.add_parser(
        name, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    add_client_flags(p)
    add_debug_flag(p)
    return p


def on_sidecar(run: Command) -> Command:
    """A command that asks a sidecar: refused under the retired TLS
    variable, and a failed call is one line naming what to fix."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        if retired := retired_tls_variable(serving=False):
            raise CommandError(retired)
        from lcic_guard_client import GuardError

        try:
            return run(args)
        except GuardError as exc:
            raise sidecar_error(exc, args.target, args.token_file) from exc

    return wrapped


def _read_pem(path: str | None, flag: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"{flag} {path}: cannot read it ({exc.strerror})") from None


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    # The token alone, or a line of the sidecar's own token file.
    token = token_to_send(readable_text_file(Path(path), "--token-file"))
    if token is None:
        raise CommandError(f"--token-file {path}: holds no token")
    return token


def client(args: argparse.Namespace) -> GuardClient:
    """The client of the sidecar the command's flags name."""
    from lcic_guard_client import GuardClient, TlsConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CommandError("--tls-cert and --tls-key go together (mutual TLS)")
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TlsConfig(
            root_certificates=_read_pem(args.tls_ca, "--tls-ca"),
            certificate_chain=_read_pem(args.tls_cert, "--tls-cert"),
            private_key=_read_pem(args.tls_key, "--tls-key"),
        )
    # No retries: without them a call does not wait for a sidecar that cannot
    # be reached, so a person hears at once that nothing is listening.
    return GuardClient(
        args.target, timeout=5.0, retries=0, tls=tls, bearer_token=_read_token(args.token_file)
    )


def time_flag(text: str, flag: str, now: Millis, *, future: bool) -> Millis:
    """``--at``/``--until``: an RFC 3339 time or a duration from ``now`` (see
    :func:`render.parse_at`), or the line that says what is wrong with it."""
    try:
        return render.parse_at(text, now, flag, future=future)
    except argparse.ArgumentTypeError as exc:
        raise CommandError(str(exc)) from None


def utc(ms: Millis) -> datetime.datetime:
    """A time as the client takes it."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


# -- commands on Redis --------------------------------------------------------------


def settings(args: argparse.Namespace) -> Settings:
    """The settings of a command that runs on Redis, with logging set up."""
    from lcic_guard import runner  # imports grpc: see main()

    try:
        out = settings_from(args)
    except SystemExit as exc:  # a combination of flags that does not go together
        if isinstance(exc.code, str):
            raise CommandError(exc.code) from None
        raise
    runner.configure_logging(out.log_level, out.log_format)
    return out


def needs_redis(settings: Settings, command: str) -> str:
    if settings.redis_url is None:
        raise CommandError(
            f"--redis-url (or LCIC_GUARD_REDIS_URL) is required: {command} works on the "
            "Redis the sidecars read; only `serve` starts a private one"
        )
    return settings.redis_url
