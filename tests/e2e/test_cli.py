"""The command line as a person meets it: every ordinary mistake is one line
that says what failed and what to do, with a documented exit status.

Everything runs the installed ``lcic-guard`` as a subprocess. One embedded
``serve`` (its private Redis, the reconciler, the sample data) is shared by
the module; the few tests that need a sidecar of their own start one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lcic_guard.demo import free_port
from lcic_guard.domain.time import format_time, parse_time

from tests.support.pki import Authority

LCIC_GUARD = str(Path(sys.executable).with_name("lcic-guard"))
ROOT = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LCIC_GUARD_")}
    return env | {"LCIC_GUARD_LOG_FORMAT": "json"} | extra


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LCIC_GUARD, *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout,
        env=env or clean_env(),
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The command failed with ``code`` and said so in one line holding ``fragments``."""
    err = done.stderr.strip()
    assert done.returncode == code, (done.returncode, done.stdout, err)
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def banner(self) -> str:
        return self.out.read_text(encoding="utf-8")

    @property
    def logs(self) -> str:
        return self.err.read_text(encoding="utf-8")

    @property
    def target(self) -> str:
        match = re.search(r"serving on (\S+)", self.banner)
        assert match, self.banner
        return match.group(1)

    @property
    def port(self) -> int:
        return int(self.target.rpartition(":")[2])

    @property
    def redis_url(self) -> str:
        """The embedded default's private Redis (from its log: this works
        whatever the banner says)."""
        match = re.search(r"private redis-server on 127\.0\.0\.1:(\d+)", self.logs)
        assert match, self.logs
        return f"redis://127.0.0.1:{match.group(1)}/0"

    def interrupt(self) -> int:
        """Ctrl-C as a terminal sends it: to the whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(30)


@contextmanager
def serving(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    tmp.mkdir(parents=True, exist_ok=True)
    out, err = tmp / "stdout", tmp / "stderr"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [LCIC_GUARD, "serve", "--listen", "127.0.0.1:0", "--shutdown-delay", "0", *args],
            stdout=o,
            stderr=e,
            env=env or clean_env(),
            start_new_session=True,  # its own process group, as in a terminal
        )
    served = Served(proc, out, err)
    try:
        wait_for(
            "the banner",
            lambda: "Press Ctrl-C" in served.banner or proc.poll() is not None,
            timeout=30,
        )
        assert proc.poll() is None, served.logs
        yield served
    finally:
        if proc.poll() is None:
            with_group = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                with_group = False
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                if with_group:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``scripts/run``'s sidecar: the embedded default with its sample data."""
    with serving(tmp_path_factory.mktemp("demo")) as served:
        yield served


def released(demo: Served) -> bool:
    done = run("check", "recording", "app-released", "--json", "--target", demo.target)
    return bool(json.loads(done.stdout)["reason"] == "RESOURCES_RELEASED")


# -- 1: a taken or impossible port --------------------------------------------


def test_a_second_sidecar_on_a_taken_port_is_refused(demo: Served) -> None:
    taken = f"127.0.0.1:{demo.port}"
    for extra in ((), ("--workers", "2")):
        done = run("serve", "--listen", taken, "--redis-url", demo.redis_url, *extra)
        one_line(done, 2, f"cannot listen on {taken}", "already in use", "--listen")


def test_a_port_another_program_holds_is_refused() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        for workers in ("1", "2"):  # refused before a private Redis is started
            done = run("serve", "--listen", taken, "--workers", workers)
            one_line(done, 2, f"cannot listen on {taken}", "already in use")


@pytest.mark.parametrize("listen", ["127.0.0.1:99999", "nonsense", "127.0.0.1:-1"])
def test_an_impossible_listen_address_is_one_line(listen: str) -> None:
    done = run("serve", "--listen", listen)
    one_line(done, 2, f"invalid address '{listen}'", "HOST:PORT", "lcic-guard serve --help")


# -- 2: no tracebacks for ordinary mistakes -----------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "not a url"])
def test_a_bad_redis_url_is_one_line(url: str) -> None:
    one_line(run("serve", "--redis-url", url), 2, f"invalid Redis URL '{url}'", "redis://")
    env = clean_env(LCIC_GUARD_REDIS_URL=url)
    one_line(run("release-plan", env=env), 2, "LCIC_GUARD_REDIS_URL", "invalid Redis URL")


def test_an_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    events = tmp_path / "events.jsonl"
    events.write_text(run("sample-events").stdout)
    for args in (
        ("release-plan",),
        ("events", "publish", str(events)),
        ("reconcile",),
    ):
        done = run(*args, "--redis-url", dead)
        one_line(done, 2, f"cannot reach Redis at {dead}", "is it running?")
    # --debug adds the traceback, and only then.
    for debug in (("release-plan", "--debug"), ("--debug", "release-plan")):
        done = run(*debug, "--redis-url", dead)
        assert done.returncode == 2 and "Traceback" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("lcic-guard release-plan: cannot")


def test_an_unreadable_events_file_is_one_line(tmp_path: Path, demo: Served) -> None:
    binary = tmp_path / "events.bin"
    binary.write_bytes(bytes(range(256)))
    cases = {
        str(tmp_path / "missing.jsonl"): "no such file",
        str(tmp_path): "is a directory",
        str(binary): "not a text file",
    }
    for path, why in cases.items():
        done = run("events", "publish", path, "--redis-url", demo.redis_url)
        one_line(done, 2, path, why)
    unreadable = tmp_path / "secret.jsonl"
    unreadable.write_text("{}\n")
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads everything
        one_line(run("events", "publish", str(unreadable), "--redis-url", demo.redis_url), 2)


@pytest.mark.parametrize("example", ["classroom_service.py", "recording_gateway.py"])
def test_an_example_on_a_busy_port_is_one_line(example: str, tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / example),
                "--listen",
                taken,
                "--guard",
                f"127.0.0.1:{free_port()}",
                "--wait-fresh",
                "0",
                *(["--dir", str(tmp_path)] if example == "recording_gateway.py" else []),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"cannot listen on {taken} (Address already in use)" in done.stderr


# -- 3: no quiet wrong behaviour ------------------------------------------------


def _xlen(url: str) -> int:
    done = subprocess.run(
        ["redis-cli", "-u", url, "XLEN", "lcic:billing:events"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def test_publish_validates_first_and_publishes_nothing_on_an_invalid_line(
    tmp_path: Path, demo: Served
) -> None:
    good = {
        "event_id": "cli-reg-1",
        "type": "application_registered",
        "occurred_at": "2026-01-01T00:00:00Z",
        "account_id": "acct-cli",
        "app_id": "app-cli",
    }
    bad = {"event_id": "cli-bad-1", "type": "overdue_alert", "occurred_at": "yesterday"}
    path = tmp_path / "events.jsonl"
    path.write_text(f"# a comment\n{json.dumps(good)}\n\n{json.dumps(bad)}\nnot json\n")
    before = _xlen(demo.redis_url)

    done = run("events", "publish", str(path), "--redis-url", demo.redis_url)
    assert done.returncode == 1, done.stderr
    err = done.stderr.splitlines()
    assert err[0] == f"{path}:4: invalid: account_id: missing" or err[0].startswith(f"{path}:4:")
    assert err[1].startswith(f"{path}:5: invalid: event: not valid JSON")
    assert "2 invalid line(s): nothing published" in err[2] and "--skip-invalid" in err[2]
    assert _xlen(demo.redis_url) == before

    done = run("events", "publish", str(path), "--skip-invalid", "--redis-url", demo.redis_url)
    assert done.returncode == 1
    assert "published 1 events" in done.stdout and "2 invalid, not published" in done.stdout
    assert _xlen(demo.redis_url) == before + 1


def test_publish_refuses_an_event_from_the_future_before_touching_redis(tmp_path: Path) -> None:
    future = {
        "event_id": "cli-future-1",
        "type": "arrears_settled",
        "occurred_at": "2099-01-01T00:00:00Z",
        "account_id": "acct-cli",
    }
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(future) + "\n")
    # Nothing listens there: the line is refused before any connection.
    done = run("events", "publish", str(path), "--redis-url", "redis://127.0.0.1:1")
    assert done.returncode == 1, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith(f"{path}:1: invalid: occurred_at: 2099-01-01T00:00:00.000Z"), first


def test_reconcile_fails_at_start_on_a_missing_events_file(demo: Served) -> None:
    done = run("reconcile", "--events", "/nonexistent/events.jsonl", "--redis-url", demo.redis_url)
    one_line(done, 2, "--events /nonexistent/events.jsonl: no such file")


@pytest.mark.parametrize("command", ["release-plan", "reconcile"])
def test_commands_on_the_shared_redis_require_its_url(command: str) -> None:
    one_line(run(command), 2, "--redis-url (or LCIC_GUARD_REDIS_URL) is required")


def test_publish_help_does_not_promise_a_private_redis() -> None:
    text = run("events", "publish", "--help").stdout
    assert "private" not in text and "Required" in text
    assert "docs/events.md" in text and "--skip-invalid" in text


def test_the_target_comes_from_the_environment(demo: Served) -> None:
    done = run("check", "create", "app-active", env=clean_env(LCIC_GUARD_TARGET=demo.target))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ALLOWED · OK")


# -- 4: check reads like the rest ---------------------------------------------


def test_check_prints_one_line_for_a_person(demo: Served) -> None:
    done = run("check", "create", "app-overdue", "--target", demo.target)
    assert done.returncode == 1
    line = done.stdout.strip()
    assert "\n" not in line
    assert re.fullmatch(
        r"DENIED · ACCOUNT_OVERDUE · release in 5\dd \d+h — .*Top up the account.*", line
    ), line

    done = run("check", "create", "app-grace", "--target", demo.target)
    assert done.returncode == 0
    assert re.match(r"ALLOWED · OVERDUE_GRACE · grace ends in 2\dh", done.stdout), done.stdout

    done = run("check", "enter", "app-quota", "--room", "room-live", "--target", demo.target)
    assert done.returncode == 0
    assert done.stdout.startswith("ALLOWED · IN_PROGRESS_PROTECTED · protected until 20")


def test_check_json_is_stable(demo: Served) -> None:
    done = run("check", "create", "app-overdue", "--json", "--target", demo.target)
    assert done.returncode == 1
    raw = json.loads(done.stdout)
    assert raw["allowed"] is False  # present when denied too
    assert raw["reason"] == "ACCOUNT_OVERDUE" and raw["state"] == "SUSPENDED"
    assert raw["reasons"] == ["ACCOUNT_OVERDUE"]
    assert isinstance(raw["status_version"], int) and raw["status_version"] >= 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", raw["release_at"])
    assert raw["grace_ends_at"] is not None and raw["protected_until"] is None
    assert raw["valid_until"] is not None  # every field of the Decision (issue 21)
    assert set(raw) == {
        "check",
        "app_id",
        "allowed",
        "reason",
        "reasons",
        "state",
        "message",
        "degraded",
        "shadow",
        "status_version",
        "grace_ends_at",
        "suspended_at",
        "release_at",
        "protected_until",
        "valid_until",
    }
    allowed = json.loads(
        run("check", "create", "app-active", "--json", "--target", demo.target).stdout
    )
    assert allowed["allowed"] is True and allowed["reason"] == "OK"


def test_check_help_documents_exit_codes() -> None:
    text = run("check", "--help").stdout
    assert "exit status:" in text
    assert "1  check, explain: the check is denied" in text
    assert "--target" in text and "LCIC_GUARD_TARGET" in text


def test_the_banner_hint_prints_an_answer_not_protobuf_text(demo: Served) -> None:
    assert "print(d.allowed, d.message)" in demo.banner


# -- 5: client commands reach a secured sidecar, or say why not ----------------


def test_an_unreachable_sidecar_is_one_line() -> None:
    target = f"127.0.0.1:{free_port()}"
    for args in (
        ("check", "create", "app-1"),
        ("status", "app-1"),
        ("explain", "app-1", "--check", "create"),
        ("preview", "app-1", "--at", "+1h"),
    ):
        done = run(*args, "--target", target)
        one_line(done, 2, f"cannot reach the sidecar at {target}", "`lcic-guard serve` running?")


def test_client_commands_take_token_and_tls(tmp_path: Path, demo: Served) -> None:
    ca = Authority(tmp_path, "ca")
    server = ca.issue("sidecar", server=True)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token\n")
    mine = tmp_path / "my-token"
    mine.write_text("s3cret-token\n")
    with serving(
        tmp_path / "secured",
        "--redis-url",
        demo.redis_url,
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        "--auth-token-file",
        str(tokens),
        "--auth-checks",
    ) as secured:
        target = secured.target
        done = run(
            "status",
            "app-grace",
            "--target",
            target,
            "--tls-ca",
            str(ca.ca),
            "--token-file",
            str(mine),
        )
        assert done.returncode == 0, done.stderr
        assert "Application app-grace" in done.stdout

        env = clean_env(
            LCIC_GUARD_TARGET=target,
            LCIC_GUARD_CLIENT_TLS_CA=str(ca.ca),
            LCIC_GUARD_TOKEN_FILE=str(mine),
        )
        done = run("check", "create", "app-grace", env=env)
        assert done.returncode == 0 and done.stdout.startswith("ALLOWED · OVERDUE_GRACE")
        done = run("preview", "app-grace", "--at", "+25h", env=env)
        assert done.returncode == 0 and "state: SUSPENDED" in done.stdout

        done = run("check", "create", "app-grace", "--target", target, "--tls-ca", str(ca.ca))
        one_line(done, 2, "wants a bearer token", "--token-file")
        done = run("check", "create", "app-grace", "--target", target, "--token-file", str(mine))
        one_line(done, 2, f"the sidecar at {target}")
        done = run("check", "create", "app-grace", "--target", target, "--tls-ca", "/nonexistent")
        one_line(done, 2, "--tls-ca /nonexistent: cannot read it")
    # TLS to a sidecar without it
    done = run("check", "create", "app-grace", "--target", demo.target, "--tls-ca", str(ca.ca))
    one_line(done, 2, f"cannot reach the sidecar at {demo.target} over TLS", "--tls-ca")


# -- 6, 7: a dead Redis is said plainly; explain still shows the answer ----------


def test_serve_against_a_dead_redis_says_so_and_explain_shows_the_degraded_answer(
    tmp_path: Path,
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with serving(tmp_path, "--redis-url", dead, "--max-heartbeat-age", "0") as served:
        banner = served.banner
        assert "WARNING: Redis does not answer" in banner and "--redis-url" in banner
        assert "Sample applications" not in banner and "app-" not in banner
        done = run("explain", "app-grace", "--check", "create", "--target", served.target)
        assert done.returncode == 0, done.stderr  # failure mode open (R13)
        assert done.stdout.startswith("Check create for app-grace: ALLOWED")
        assert "degraded" in done.stdout
        assert "The status record cannot be read now" in done.stdout


# -- 8: parsing and help ------------------------------------------------------------


def test_preview_times_are_parsed_once_and_forgivingly(demo: Served) -> None:
    done = run("preview", "app-grace", "--at", "soon", "--target", demo.target)
    err = one_line(done, 2, "--at: not an RFC 3339 timestamp", "+25h")
    assert err.count("--at:") == 1
    for at in ("+1h30m", "+2d12h", "36h"):
        done = run("preview", "app-grace", "--at", at, "--target", demo.target)
        assert done.returncode == 0, (at, done.stderr)
        assert "Preview of app-grace at" in done.stdout
    done = run("preview", "app-grace", "--at", "+1h30m", "--target", demo.target)
    assert re.search(r"at \S+ \(in 1h (29|30)m\)", done.stdout), done.stdout


def test_version_and_usage_errors() -> None:
    done = run("--version")
    assert done.returncode == 0 and re.fullmatch(r"lcic-guard \S+\n", done.stdout)
    done = run("check", "create", "app-1", "--bogus")
    one_line(
        done, 2, "lcic-guard check: unrecognized arguments: --bogus", "lcic-guard check --help"
    )
    one_line(run(), 2, "lcic-guard: the following arguments are required: COMMAND")


def test_help_lists_each_commands_own_flags() -> None:
    text = run("reconcile", "--help").stdout
    for flag in ("--grace", "--release-after", "--release-margin", "--redis-url"):
        assert flag in text
    for flag in ("--stale-bound", "--failure-mode-create", "--listen", "--target"):
        assert flag not in text
    plan = " ".join(run("release-plan", "--help").stdout.split())
    assert "whether it would be performed if it fell due now" in plan
    assert "--release-dry-run [true|false]" in run("serve", "--help").stdout


def test_a_boolean_flag_alone_means_true(demo: Served) -> None:
    done = run("release-plan", "--release-dry-run", "--redis-url", demo.redis_url)
    assert done.returncode == 0, done.stderr
    done = run("release-plan", "--release-dry-run", "maybe", "--redis-url", demo.redis_url)
    one_line(done, 2, "invalid boolean 'maybe'")


def test_release_plan_prints_a_table_with_a_header(demo: Served) -> None:
    wait_for("the demo's release", lambda: released(demo))
    done = run("release-plan", "--redis-url", demo.redis_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "ACCOUNT",
        "APPLICATIONS",
        "RELEASE",
        "AT",
        "IF",
        "DUE",
        "NOW",
        "WHY",
    ]
    overdue = next(line for line in lines if line.startswith("acct-overdue "))
    assert "app-overdue" in overdue and "not now" in overdue and "\t" not in overdue


# -- 10: a released account has no deadlines ------------------------------------------


def test_a_released_account_lists_no_package_deadline(demo: Served) -> None:
    wait_for("the demo's release", lambda: released(demo))
    done = run("status", "app-released", "--target", demo.target)
    assert done.returncode == 0, done.stderr
    assert "RELEASED" in done.stdout
    assert "PACKAGE_EXPIRY" not in done.stdout
    assert "unless a package is bought" not in done.stdout
    assert "Changes ahead" not in done.stdout
    done = run("check", "recording", "app-released", "--target", demo.target)
    assert re.match(r"DENIED · RESOURCES_RELEASED · released (now|[0-9dhm ]+ ago) — ", done.stdout)


# -- 11: the demo says where its Redis is and how to feed it -----------------------------


def test_the_banner_shows_the_private_redis_and_how_to_publish_to_it(demo: Served) -> None:
    banner = demo.banner
    assert f"Private Redis (stopped with this process): {demo.redis_url}" in banner
    assert "docs/events.md" in banner
    new = re.search(r"lcic-guard events new (.*) \\$", banner, re.MULTILINE)
    assert new, banner
    assert f"lcic-guard events publish - --redis-url {demo.redis_url}" in banner
    # The printed example works: acct-overdue pays and is served again.
    event = run("events", "new", *new.group(1).split())
    assert event.returncode == 0, event.stderr
    done = run("events", "publish", "-", "--redis-url", demo.redis_url, stdin=event.stdout)
    assert done.returncode == 0, done.stderr

    def settled() -> bool:
        return run("check", "create", "app-overdue", "--target", demo.target).returncode == 0

    wait_for("the settlement to be applied", settled)


ANNOUNCED = {
    "status_changed": {
        "app_id",
        "account_id",
        "old_state",
        "old_reasons",
        "new_state",
        "reasons",
        "version",
        "suspended_at",
        "grace_ends_at",
        "release_at",
    },
    "resources_released": {"account_id", "app_ids"},
    "release_scheduled": {"account_id", "app_ids", "release_at"},
    "suspension_scheduled": {"account_id", "scope", "app_id", "app_ids", "reason", "at", "notice"},
    "override_applied": {
        "account_id",
        "override",
        "event_id",
        "actor",
        "reason",
        "made_at",
        "recorded_at",
        "until",
        "effect",
    },
}


def test_announcements_carry_the_documented_fields(demo: Served) -> None:
    wait_for("the demo's release", lambda: released(demo))
    doc = (ROOT / "docs/events.md").read_text(encoding="utf-8")

    def announced() -> list[Any]:
        done = subprocess.run(
            ["redis-cli", "-u", demo.redis_url, "--json", "XRANGE", "lcic:guard:events", "-", "+"],
            capture_output=True,
            text=True,
            check=True,
        )
        entries: list[Any] = json.loads(done.stdout)
        return entries

    # Status changes are announced once they have held for the settle time.
    wait_for("a status change", lambda: "status_changed" in json.dumps(announced()))
    entries = announced()
    seen = set()
    for _id, fields in entries:
        event = json.loads(dict(zip(fields[::2], fields[1::2], strict=True))["event"])
        kind = event["type"]
        assert f"**`{kind}`**" in doc, kind
        assert {"type", "announcement_id", "occurred_at"} | ANNOUNCED[kind] <= set(event), event
        assert event["occurred_at"].endswith("Z")
        seen.add(kind)
    assert {"status_changed", "resources_released", "suspension_scheduled"} <= seen


def test_the_plain_serve_banner_names_no_demo_apps(tmp_path: Path, demo: Served) -> None:
    with serving(tmp_path, "--redis-url", demo.redis_url) as served:
        assert "Sample applications" not in served.banner
        assert "app-grace" not in served.banner and "Private Redis" not in served.banner


def test_the_readme_points_to_the_event_format() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/events.md" in readme and "When something goes wrong" in readme
    assert "sample-events" in readme


# -- 9: Ctrl-C stops everything quietly ----------------------------------------------------


def _children(pid: int) -> list[int]:
    """Of every thread: the private Redis is started from a worker thread."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def test_ctrl_c_stops_without_a_false_change_feed_warning(tmp_path: Path) -> None:
    for n in range(2):
        with serving(tmp_path / str(n)) as served:
            # The private Redis must not get the terminal's Ctrl-C: stopped
            # before the sidecar has drained, it makes the feed look lost.
            redis = [c for c in _children(served.proc.pid) if "redis" in _cmdline(c)]
            assert redis, "no private redis-server"
            assert os.getpgid(redis[0]) != os.getpgid(served.proc.pid)
            code = served.interrupt()
            logs = served.logs
        assert code == 130, logs  # as a shell reports an interrupted command
        assert "change feed lost" not in logs
        assert "Traceback" not in logs
        assert not Path(f"/proc/{redis[0]}").exists()  # and it is stopped with the sidecar


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# -- support overrides (issue 15) ----------------------------------------------------


def test_override_and_audit_through_a_sidecar(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("admin-token-000 admin\nreader-token-000 read\n")
    admin, reader = tmp_path / "admin", tmp_path / "reader"
    admin.write_text("admin-token-000\n")
    reader.write_text("reader-token-000\n")
    with serving(tmp_path / "served", "--auth-token-file", str(tokens)) as served:
        env = clean_env(LCIC_GUARD_TARGET=served.target, LCIC_GUARD_TOKEN_FILE=str(admin))
        before = json.loads(run("check", "create", "app-grace", "--json", env=env).stdout)
        done = run(
            "override",
            "extend-grace",
            "acct-grace",
            "--until",
            "+3d",
            "--reason",
            "bank transfer in flight (ticket 4411)",
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("recorded extend-grace of account acct-grace until ")

        def extended() -> bool:
            d = json.loads(run("check", "create", "app-grace", "--json", env=env).stdout)
            return bool(d["grace_ends_at"] > _later(before["grace_ends_at"], DAY_MS))

        wait_for("the extension to be applied", extended)

        done = run("audit", "acct-grace", env=env | {"LCIC_GUARD_TOKEN_FILE": str(reader)})
        assert done.returncode == 0, done.stderr
        header, row = done.stdout.splitlines()
        assert header.split()[:4] == ["MADE", "RECORDED", "KIND", "ACTOR"]
        assert "EXTEND_GRACE" in row and "token:" in row and "ticket 4411" in row

        # Not an admin: refused, and said in one line.
        done = run(
            "override",
            "hold-release",
            "acct-grace",
            "--reason",
            "dispute",
            env=env | {"LCIC_GUARD_TOKEN_FILE": str(reader)},
        )
        one_line(done, 2, "refused the call", "admin")
        # A bad field is named.
        done = run(
            "override", "extend-grace", "acct-good", "--until", "+1d", "--reason", "x", env=env
        )
        one_line(done, 2, "until:", "no overdue episode")
        done = run("override", "clear-hold", "acct-grace", "--reason", "", env=env)
        one_line(done, 2, "reason:")
        done = run("override", "extend-grace", "acct-grace", "--reason", "x", env=env)
        one_line(done, 2, "--until is required")


DAY_MS = 24 * 3600 * 1000


def _later(rfc3339: str, ms: int) -> str:
    """An RFC 3339 UTC time ``ms`` later, in the same form (so the two compare
    as strings)."""
    return format_time(parse_time(rfc3339, "t") + ms)


# -- issue 21: first contact, second pass ------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:PORT/0", "redis://127.0.0.1:99999/0"])
def test_a_redis_url_with_a_bad_port_is_a_usage_error_in_every_command(url: str) -> None:
    port = url.split(":")[2].split("/")[0]
    for args in (
        ("serve",),
        ("reconcile",),
        ("release-plan",),
        ("events", "publish", "-"),
    ):
        done = run(*args, "--redis-url", url, stdin="")
        one_line(done, 2, f"invalid Redis URL '{url}'", f"port '{port}'", "redis://HOST:PORT/DB")
    env = clean_env(LCIC_GUARD_REDIS_URL=url)
    one_line(run("release-plan", env=env), 2, "LCIC_GUARD_REDIS_URL", "invalid Redis URL")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://127.0.0.1:6379/zero", "database 'zero'"),
        ("redis+sentinel://s1:26379,s2:x/mymaster", "port 'x'"),
        ("redis+sentinel://s1:26379", "no service name"),
    ],
)
def test_other_redis_url_mistakes_are_named(url: str, why: str) -> None:
    one_line(run("release-plan", "--redis-url", url), 2, "invalid Redis URL", why)


def test_events_new_prints_an_event_dated_now_that_the_reconciler_applies(
    demo: Served,
) -> None:
    """The README's settlement works on any day: no date to write by hand."""
    done = run("events", "new", "arrears_settled", "account_id=acct-overdue")
    assert done.returncode == 0, done.stderr
    event = json.loads(done.stdout)
    assert event["type"] == "arrears_settled" and event["account_id"] == "acct-overdue"
    assert abs(parse_time(event["occurred_at"], "t") - time.time() * 1000) < 60_000
    # Numbers and booleans with :=, and the event is validated before it is printed.
    done = run("events", "new", "payg_changed", "app_id=app-x", "enabled:=true")
    assert json.loads(done.stdout)["enabled"] is True
    one_line(run("events", "new", "arrears_settled"), 2, "account_id: missing")
    one_line(run("events", "new", "payg_changed", "app_id=a", "enabled=true"), 2, "enabled")
    published = run(
        "events",
        "publish",
        "-",
        "--redis-url",
        demo.redis_url,
        stdin=event_line("arrears_settled", "account_id=acct-settled"),
    )
    assert published.returncode == 0, published.stderr
    # It says what publishing cannot know: an event may change nothing.
    assert "published 1 events" in published.stdout
    assert "changes nothing if it is dated before" in published.stdout


def event_line(*args: str) -> str:
    done = run("events", "new", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_until_and_at_are_named_and_a_past_time_is_refused(demo: Served) -> None:
    t = ("--target", demo.target)
    # A bare duration means from now; a mistake names the flag it is in.
    done = run("override", "extend-grace", "acct-grace", "--until", "soon", "--reason", "x", *t)
    err = one_line(done, 2, "--until: not an RFC 3339 timestamp")
    assert "--at" not in err
    done = run("override", "extend-grace", "acct-grace", "--until", "-1d", "--reason", "x", *t)
    one_line(done, 2, "--until -1d is in the past")
    done = run("preview", "app-grace", "--at", "-1h", *t)
    one_line(done, 2, "--at -1h is in the past")
    done = run("preview", "app-grace", "--at", "2020-01-01T00:00:00Z", *t)
    assert done.returncode == 0 and "these are the answers now" in done.stderr
    done = run("preview", "app-grace", "--at", "25h", *t)
    assert done.returncode == 0 and "state: SUSPENDED" in done.stdout, done.stderr


def test_a_mistyped_command_gets_a_suggestion() -> None:
    one_line(run("chek", "create", "app-1"), 2, "invalid choice: 'chek'", "did you mean 'check'?")
    one_line(run("check", "creat", "app-1"), 2, "did you mean 'create'?")
    err = one_line(run("frobnicate"), 2, "invalid choice")
    assert "did you mean" not in err


def test_a_refused_token_is_not_told_to_pass_a_token(tmp_path: Path, demo: Served) -> None:
    tokens, wrong = tmp_path / "tokens", tmp_path / "wrong"
    tokens.write_text("right-token-000 read\n")
    wrong.write_text("wrong-token-000\n")
    with serving(
        tmp_path / "s",
        "--redis-url",
        demo.redis_url,
        "--auth-token-file",
        str(tokens),
        "--auth-checks",
    ) as secured:
        done = run(
            "check", "create", "app-grace", "--target", secured.target, "--token-file", str(wrong)
        )
        err = one_line(done, 2, f"refused the token in {wrong}")
        assert "pass --token-file" not in err
        done = run("check", "create", "app-grace", "--target", secured.target)
        one_line(done, 2, "wants a bearer token", "pass --token-file")


def test_each_announcement_is_one_distinct_line_naming_what_it_announces(demo: Served) -> None:
    """The demo warns of several suspensions of one account: each log line
    names its application, reason and date, so no two read the same."""

    def announced() -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in demo.logs.splitlines()
            if line.startswith("{") and json.loads(line).get("event") == "suspension_scheduled"
        ]

    # Announced once each warning has held for the settle time.
    wait_for(
        "acct-good's warnings",
        lambda: len([x for x in announced() if x["account_id"] == "acct-good"]) >= 2,
        timeout=30,
    )
    lines = announced()
    assert len({x["msg"] for x in lines}) == len(lines), [x["msg"] for x in lines]
    for x in lines:
        assert x["reason"] in x["msg"] and x["at"] in x["msg"], x
        assert all(app in x["msg"] for app in x["app_ids"]), x


def test_a_healthy_start_logs_no_warning_and_the_banner_runs_as_printed(demo: Served) -> None:
    warnings = [
        line
        for line in demo.logs.splitlines()
        if line.startswith("{")
        and json.loads(line)["level"] in ("WARNING", "ERROR")
        # R10 releases the sample's released account: a WARNING on purpose.
        and json.loads(line).get("event") != "resources_released"
    ]
    assert not warnings, warnings
    # Each command the banner prints runs as printed from the project's folder.
    commands = re.findall(r"^  (\S*lcic-guard) (check .*)$", demo.banner, re.MULTILINE)
    assert commands, demo.banner
    for program, rest in commands:
        done = subprocess.run(
            [program, *rest.split()],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=clean_env(PATH="/usr/bin:/bin"),
            check=False,
            timeout=30,
        )
        assert done.returncode in (0, 1), (program, done.stderr)


def test_release_plan_labels_its_notices_and_tells_scheduled_from_due(demo: Served) -> None:
    done = run("release-plan", "--redis-url", demo.redis_url)
    assert done.returncode == 0, done.stderr
    sections = done.stdout.strip().split("\n\n")
    notices = next(s for s in sections if s.startswith("Release notices"))
    heading, header, *rows = notices.splitlines()
    assert heading.startswith("Release notices")
    assert header.split() == ["ACCOUNT", "NOTICE", "AT", "STATE"]
    now = time.time() * 1000
    for row in rows:
        at = parse_time(row.split()[2], "at")
        state = row.split(None, 3)[3]
        if at > now:  # months away: not "due"
            assert state.startswith("scheduled (in ") and "due" not in state, row
    assert any("scheduled (in " in row for row in rows), rows


def _as_in_a_terminal() -> None:
    # A job started in the background inherits SIGINT ignored, and a
    # program keeps it so; a terminal's foreground command does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _catches_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
    return bool(caught & (1 << (signal.SIGINT - 1)))


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.35, 0.6])
def test_ctrl_c_while_starting_is_quiet_with_status_130(delay: float) -> None:
    proc = subprocess.Popen(
        [LCIC_GUARD, "serve", "--listen", "127.0.0.1:0", "--shutdown-delay", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )
    # From when the interpreter is up (it catches SIGINT): before that, and
    # while the generated script imports its first modules, no program's code
    # runs yet.
    try:
        wait_for("the interpreter", lambda: _catches_sigint(proc.pid), timeout=30)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # nothing left behind when the test fails
            os.killpg(proc.pid, signal.SIGTERM)  # stops its private Redis too
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err
