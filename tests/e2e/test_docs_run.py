"""The README's tour, run as written against the real demo, so that the docs
cannot drift from the program again: each shell command is taken from the
Markdown, run, and held to the exit status and the key words its comment
promises (``# DENIED · ACCOUNT_OVERDUE · release in 57d 23h — …``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lcic.guard.v1 import enforcement_pb2 as pb

from tests.e2e.test_cli import LCIC_GUARD, ROOT, Served, clean_env, serving

README = (ROOT / "README.md").read_text(encoding="utf-8")
# Words a comment may promise that the output must then hold.
KEY_WORDS = (
    {"ALLOWED", "DENIED"}
    | {v.name.removeprefix("DECISION_REASON_") for v in pb.DecisionReason.DESCRIPTOR.values}
    | {v.name.removeprefix("APPLICATION_STATE_") for v in pb.ApplicationState.DESCRIPTOR.values}
)


@dataclass
class Step:
    command: str
    comment: str

    @property
    def expected_code(self) -> int:
        if "exit status 1" in self.comment or self.comment.startswith("DENIED"):
            return 1
        return 0


def shell_blocks(markdown: str) -> list[list[Step]]:
    """Each ```sh block as its commands (continuation lines joined), each
    with the comment after it."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", markdown, re.DOTALL):
        steps: list[Step] = []
        pending = ""
        for line in body.splitlines():
            command, comment = _split(line)
            if command.rstrip().endswith("\\"):
                pending += command.rstrip()[:-1] + " "
                continue
            steps.append(Step((pending + command).strip(), comment.strip()))
            pending = ""
        blocks.append([s for s in steps if s.command and not s.command.startswith("#")])
    return blocks


def _split(line: str) -> tuple[str, str]:
    command, _, comment = (
        re.split(r"\s(#\s)", line, maxsplit=1) if " # " in line else (line, "", "")
    )
    return command, comment


def block_with(text: str) -> list[Step]:
    found = [b for b in shell_blocks(README) if any(text in s.command for s in b)]
    assert len(found) == 1, (text, found)
    return found[0]


def promised(comment: str) -> re.Pattern[str] | None:
    """``ALLOWED · OVERDUE_GRACE · grace ends in 21h 59m — …`` as a pattern
    the first line must match (numbers may differ: the demo is dated now)."""
    head = comment.split(" — ")[0].split(" (")[0].rstrip(" …")
    if not head.startswith(("ALLOWED ·", "DENIED ·")):
        return None
    return re.compile(re.sub(r"\d+", r"\\d+", re.escape(head)))


def run_step(step: Step, env: dict[str, str], redis_url: str, until: float = 0) -> str:
    command = step.command.replace(".venv/bin/lcic-guard", LCIC_GUARD).replace(
        "redis://127.0.0.1:PORT/0", redis_url
    )
    deadline = time.monotonic() + until
    while True:
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        failure = _broken(step, done)
        if failure is None:
            return done.stdout
        # A published event is applied a moment later: ask again until then.
        assert time.monotonic() < deadline, failure


def _broken(step: Step, done: subprocess.CompletedProcess[str]) -> str | None:
    out = done.stdout
    if "| head" in step.command and done.returncode == 141:
        done.returncode = 0
    if done.returncode != step.expected_code:
        return f"{step.command}: exit {done.returncode}, not {step.expected_code}: {done.stderr}"
    pattern = promised(step.comment)
    if pattern is not None and not pattern.match(out):
        return f"{step.command}: {out!r} is not {pattern.pattern!r}"
    for word in set(re.findall(r"\b[A-Z][A-Z_]+\b", step.comment)) & KEY_WORDS:
        if word not in out:
            return f"{step.command}: {word} promised, not in {out!r}"
    return None


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("tour")) as served:
        yield served


def test_the_tour_runs_as_written(demo: Served) -> None:
    env = clean_env(LCIC_GUARD_TARGET=demo.target)
    tour = block_with("check create app-grace")
    assert len(tour) >= 8
    for step in tour:
        run_step(step, env, demo.redis_url)


def test_the_publish_example_changes_the_demo(demo: Served) -> None:
    env = clean_env(LCIC_GUARD_TARGET=demo.target)
    steps = block_with("events new")
    published = False
    for step in steps:
        out = run_step(step, env, demo.redis_url, until=20 if published else 0)
        if "events publish" in step.command:
            assert "published 1 events" in out
            published = True
    assert published and steps[-1].comment.startswith("ALLOWED · OK")


def test_the_override_example_runs_as_written(tmp_path: Path) -> None:
    steps = block_with("override extend-grace")
    env = clean_env()
    server_args: list[str] = []
    rest: list[Step] = []
    for step in steps:
        command = step.command.replace("/tmp/", f"{tmp_path}/")
        if command.startswith("scripts/run "):
            server_args = command.split()[1:]  # what scripts/run passes to serve
        elif command.startswith("export "):
            name, _, value = command.removeprefix("export ").partition("=")
            env[name] = value
        elif server_args:
            rest.append(Step(command, step.comment))
        else:
            run_step(Step(command, step.comment), env, "")
    assert server_args and rest
    with serving(tmp_path / "served", *server_args) as served:
        env["LCIC_GUARD_TARGET"] = served.target
        for step in rest:
            run_step(step, env, served.redis_url, until=20)


def test_the_offline_build_in_the_docs_is_the_dockerfiles() -> None:
    """docs/deployment.md's offline build is the Dockerfile header's, word for word."""
    header = (ROOT / "Dockerfile").read_text(encoding="utf-8").split("\nARG ")[0]
    commands = [
        line.removeprefix("#").strip()
        for line in header.splitlines()
        if line.removeprefix("#").strip().startswith(("pip download", "docker build"))
    ]
    assert any(c.startswith("pip download") for c in commands), header
    deployment = (ROOT / "docs/deployment.md").read_text(encoding="utf-8")
    offline = deployment.split("### Building without the package index")[1].split("\n### ")[0]
    for command in commands:
        assert command in offline, command
    assert "pip install ./client ." in offline and "pip install ./client ." in README


def test_the_markdown_reader_sees_the_comments() -> None:
    tour = block_with("check create app-grace")
    assert tour[0].comment.startswith("ALLOWED · OVERDUE_GRACE")
    pattern = promised(tour[1].comment)
    assert pattern is not None and pattern.match("DENIED · ACCOUNT_OVERDUE · release in 9d 1h — x")


def _pip_dry_run(*targets: str) -> subprocess.CompletedProcess[str]:
    """What ``pip install TARGETS`` would do, resolved against the package
    index as a user's would be, installing nothing."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-build-isolation",  # the build backend comes from the lock
            "--disable-pip-version-check",
            "--quiet",
            "--report",
            "-",
            *targets,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_documented_install_works_and_the_plain_one_fails_as_documented() -> None:
    """docs/deployment.md and the README say: `pip install ./client .`, and
    that a plain `pip install .` stops at a missing lcic-guard-client."""
    deployment = (ROOT / "docs/deployment.md").read_text(encoding="utf-8")
    quoted = re.search(r"No matching distribution found for\s+lcic-guard-client", deployment)
    assert quoted and "pip install ./client ." in deployment

    done = _pip_dry_run("./client", ".")
    assert done.returncode == 0, done.stderr
    names = {i["metadata"]["name"] for i in json.loads(done.stdout)["install"]}
    assert {"lcic-guard", "lcic-guard-client"} <= names, names

    done = _pip_dry_run(".")
    assert done.returncode != 0
    assert "No matching distribution found for lcic-guard-client" in done.stderr, done.stderr
