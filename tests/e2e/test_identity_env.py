"""Whose certificate is whose, and who an override records (issue 21,
finding 8), through the installed ``lcic-guard`` run as a subprocess.

``serve`` takes its own certificate from LCIC_GUARD_TLS_*; the client
commands take theirs from LCIC_GUARD_CLIENT_TLS_*, so that one environment
(the sidecar's container, a support shell) may hold both. The retired client
variable is refused with the new names rather than guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli import clean_env, one_line, run, serving, wait_for
from tests.support.pki import Authority

RETIRED = ("LCIC_GUARD_TLS_CA is no longer read", "LCIC_GUARD_CLIENT_TLS_CA")


def actors(account: str, env: dict[str, str]) -> list[str]:
    done = run("audit", account, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return [o["actor"] for o in json.loads(done.stdout).get("overrides", [])]


def test_one_environment_holds_the_sidecars_certificate_and_the_clients(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "ca")
    server = ca.issue("sidecar", server=True)
    desk = ca.issue("desk-7", client=True, dns=("classroom-svc", "support-admin"))
    tokens = tmp_path / "tokens"
    tokens.write_text("# support staff\nsupport-alice:admin:tok-alice-3e1f\n")
    env = clean_env(
        # the sidecar's own
        LCIC_GUARD_TLS_CERT=str(server.cert),
        LCIC_GUARD_TLS_KEY=str(server.key),
        LCIC_GUARD_TLS_CLIENT_CA=str(ca.ca),
        LCIC_GUARD_AUTH_ALLOW_IDENTITY="classroom-svc,support-admin=admin",
        LCIC_GUARD_AUTH_TOKEN_FILE=str(tokens),
        # the client commands'
        LCIC_GUARD_CLIENT_TLS_CA=str(ca.ca),
        LCIC_GUARD_CLIENT_TLS_CERT=str(desk.cert),
        LCIC_GUARD_CLIENT_TLS_KEY=str(desk.key),
    )
    with serving(tmp_path / "served", env=env) as served:
        env["LCIC_GUARD_TARGET"] = served.target
        done = run("check", "create", "app-grace", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("ALLOWED")

        # By certificate: recorded as the name that grants admin, not the first.
        done = run("override", "hold-release", "acct-grace", "--reason", "dispute 77", env=env)
        assert done.returncode == 0, done.stderr
        # By a named token, sent from a line of the sidecar's own token file.
        with_token = env | {"LCIC_GUARD_TOKEN_FILE": str(tokens)}
        done = run(
            "override", "hold-release", "acct-good", "--reason", "dispute 78", env=with_token
        )
        assert done.returncode == 0, done.stderr
        wait_for("the holds to be applied", lambda: bool(actors("acct-good", env)))
        wait_for("the holds to be applied", lambda: bool(actors("acct-grace", env)))
        assert actors("acct-grace", env) == ["support-admin"]
        assert actors("acct-good", env) == ["support-alice"]
        done = run("audit", "acct-good", env=env)
        assert done.returncode == 0 and "support-alice" in done.stdout.splitlines()[1]

        # A reason that would print as something else is refused, naming it.
        for reason, code in (("refund \u202e0001 USD", "U+202E"), ("ok\u2028FAKE ROW", "U+2028")):
            done = run("override", "hold-release", "acct-grace", "--reason", reason, env=env)
            one_line(done, 2, "reason: must not contain", code)


def test_the_retired_client_variable_is_refused_with_the_new_names(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "ca")
    desk = ca.issue("desk-7", client=True, dns=("support-admin",))
    client_files = {"CA": ca.ca, "CERT": desk.cert, "KEY": desk.key}
    old = clean_env(**{f"LCIC_GUARD_TLS_{k}": str(v) for k, v in client_files.items()})
    for args in (("check", "create", "app-1"), ("status", "app-1"), ("audit", "acct-1")):
        one_line(run(*args, "--target", "127.0.0.1:1", env=old), 2, *RETIRED)
    # serve in that shell would serve TLS with the client's certificate.
    one_line(run("serve", "--listen", "127.0.0.1:0", env=old, timeout=20), 2, *RETIRED)

    # Renamed, the client's files are the client's alone: serve does not
    # take them up, and serves the loopback port without TLS.
    renamed = clean_env(**{f"LCIC_GUARD_CLIENT_TLS_{k}": str(v) for k, v in client_files.items()})
    with serving(tmp_path / "served", env=renamed) as served:
        done = run("check", "create", "app-grace", "--target", served.target)
        assert done.returncode == 0 and done.stdout.startswith("ALLOWED"), done.stderr
