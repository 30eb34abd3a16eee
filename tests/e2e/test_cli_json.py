"""One JSON dialect for every ``--json`` output, documented by
docs/cli-json.schema.json: real outputs of every command, from the real
demo over gRPC, are validated against the schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from lcic.guard.v1 import enforcement_pb2 as pb

from tests.e2e.test_cli import ROOT, Served, clean_env, run, serving

SCHEMA: dict[str, Any] = json.loads((ROOT / "docs/cli-json.schema.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    """The embedded demo with an admin token, so that override and audit run too."""
    tmp = tmp_path_factory.mktemp("json")
    (tmp / "tokens").write_text("json-admin-token admin\n")
    (tmp / "mine").write_text("json-admin-token\n")
    with serving(tmp / "served", "--auth-token-file", str(tmp / "tokens")) as served:
        yield (
            served,
            clean_env(LCIC_GUARD_TARGET=served.target, LCIC_GUARD_TOKEN_FILE=str(tmp / "mine")),
        )


def _json(env: dict[str, str], *args: str, code: int = 0) -> Any:
    done = run(*args, "--json", env=env)
    assert done.returncode == code, (args, done.stdout, done.stderr)
    return json.loads(done.stdout)


def _valid(doc: Any, kind: str) -> None:
    """Valid as ``kind`` and as the document as a whole (exactly one kind)."""
    Draft202012Validator(
        {"$ref": f"#/$defs/{kind}", "$defs": SCHEMA["$defs"]},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    ).validate(doc)
    Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(doc)
    _one_dialect(doc)


def _one_dialect(doc: Any) -> None:
    """What the schema cannot say in one place: no camelCase key, no
    prefixed enum name, no number as a string, anywhere."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            assert re.fullmatch(r"[a-z][a-z0-9_]*", key), key
            _one_dialect(value)
    elif isinstance(doc, list):
        for value in doc:
            _one_dialect(value)
    elif isinstance(doc, str):
        assert not re.match(
            r"(DECISION_REASON|APPLICATION_STATE|OVERRIDE_KIND|DEADLINE_KIND)_", doc
        )


def test_every_json_output_is_one_documented_dialect(
    secured: tuple[Served, dict[str, str]],
) -> None:
    _served, env = secured
    checks = [
        (("check", "create", "app-overdue"), 1),
        (("check", "enter", "app-quota", "--room", "room-live"), 0),
        (("check", "recording", "app-released"), 1),
        (("check", "create", "app-grace"), 0),
    ]
    for args, code in checks:
        doc = _json(env, *args, code=code)
        _valid(doc, "check")
        assert doc["check"] == args[1] and doc["app_id"] == args[2]
    overdue = _json(env, "check", "create", "app-overdue", code=1)
    assert overdue["reason"] == "ACCOUNT_OVERDUE" and overdue["state"] == "SUSPENDED"
    assert isinstance(overdue["status_version"], int) and overdue["valid_until"] is not None
    protected = _json(env, "check", "enter", "app-quota", "--room", "room-live")
    assert protected["reason"] == "IN_PROGRESS_PROTECTED" and protected["protected_until"]

    for app in ("app-overdue", "app-expiring", "app-quota", "app-released", "app-active"):
        doc = _json(env, "status", app)
        _valid(doc, "status")
        assert doc["app_id"] == app and isinstance(doc["version"], int)
    assert _json(env, "status", "app-overdue")["facts"], "the billing events behind the reason"

    doc = _json(env, "preview", "app-grace", "--at", "+25h")
    _valid(doc, "preview")
    assert doc["state"] == "SUSPENDED"
    assert doc["create_classroom"]["reason"] == "ACCOUNT_OVERDUE"
    # A Decision has the same fields wherever it appears.
    assert set(doc["create_classroom"]) == set(overdue) - {"check", "app_id"}

    made = _json(
        env, "override", "extend-grace", "acct-grace", "--until", "+3d", "--reason", "json test"
    )
    _valid(made, "override")
    assert made["kind"] == "EXTEND_GRACE" and made["until"] and made["reason"] == "json test"
    audit = _json(env, "audit", "acct-grace")
    _valid(audit, "audit")
    assert audit["account_id"] == "acct-grace"
    assert [o["event_id"] for o in audit["overrides"]] == [made["event_id"]]


def test_the_schema_names_every_enum_value_of_the_api() -> None:
    """A value the API gains is documented, or this fails."""
    defs = SCHEMA["$defs"]
    pairs = [
        (defs["reason"]["enum"], pb.DecisionReason, "DECISION_REASON_"),
        (defs["state"]["enum"], pb.ApplicationState, "APPLICATION_STATE_"),
        (defs["override"]["properties"]["kind"]["enum"], pb.OverrideKind, "OVERRIDE_KIND_"),
        (
            defs["status"]["properties"]["deadlines"]["items"]["properties"]["kind"]["enum"],
            pb.DeadlineKind,
            "DEADLINE_KIND_",
        ),
    ]
    for documented, enum, prefix in pairs:
        assert documented == [v.name.removeprefix(prefix) for v in enum.DESCRIPTOR.values], prefix


def test_the_schema_has_every_field_of_the_api_messages() -> None:
    """A field the API gains appears in the JSON (the renderer is generic),
    so it must be documented too."""
    defs = SCHEMA["$defs"]
    for kind, message in (
        ("decision", pb.Decision),
        ("status", pb.ApplicationStatus),
        ("preview", pb.PreviewApplicationResponse),
        ("override", pb.Override),
        ("warning", pb.SuspensionWarning),
    ):
        assert set(defs[kind]["properties"]) == set(message.DESCRIPTOR.fields_by_name), kind


def test_the_readme_and_help_point_to_the_schema() -> None:
    assert "docs/cli-json.schema.json" in Path(ROOT / "README.md").read_text("utf-8")
