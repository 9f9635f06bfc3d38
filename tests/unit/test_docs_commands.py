"""The documented commands parse as written (issue 40, break 8: `--tasks onset_t2d` in
docs/coordinator.md ended in an internal error, exit 3).

Every `python -m server.coordinator ...` and `python client/client.py ...` line of README.md and
docs/*.md (continuation lines joined) is parsed by the command's own argument parser, and each
task it names (`--tasks`) is a task the code knows. Placeholders in capitals (FED, SITE, TASK) and
`...` stand for the reader's own values and are not resolved.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from client.client import build_parser as client_parser
from client.client import main as client_main
from healthfm_core.data.checks.task_check import task_files
from healthfm_core.data.labels.task_spec import UnknownTask, resolve_task
from server.deploy.commands import build_parser as coordinator_parser
from server.deploy.commands import main as coordinator_main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = {
    "python -m server.coordinator": coordinator_parser,
    "python client/client.py": client_parser,
}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, program, argv) of every documented command line in a code block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        in_code = False
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                in_code = not in_code
            elif in_code:
                text = line
                while text.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    text = text.rstrip()[:-1] + " " + lines[i]
                for program in PROGRAMS:  # a command line: the program first (a diagram's mention is not)
                    if text.lstrip().removeprefix("$ ").startswith(program + " "):
                        line_text = text.lstrip().removeprefix("$ ")[len(program) :]
                        # A synopsis' optional parts ([--rounds 200]) are left out: the rest must parse.
                        while (shorter := re.sub(r"\[[^\[\]]*\]", "", line_text)) != line_text:
                            line_text = shorter
                        words = shlex.split(line_text, comments=True)
                        out.append((f"{doc.name}:{i + 1}", program, words))
            i += 1
    return out


COMMANDS = documented_commands()


def _placeholder(word: str) -> bool:
    return word in ("...", "T", "TASK") or "..." in word or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*", word))


def test_the_docs_have_commands_to_check() -> None:
    assert len(COMMANDS) > 20 and {p for _, p, _ in COMMANDS} == set(PROGRAMS)


@pytest.mark.parametrize(("where", "program", "argv"), COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_a_documented_command_parses_and_names_known_tasks(where: str, program: str, argv: list[str]) -> None:
    parser = PROGRAMS[program]()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `{program} {' '.join(argv)}` does not parse (exit {err.code})")
    for task in getattr(args, "tasks", None) or []:
        if _placeholder(task):
            continue
        if args.command == "check":  # files, folders or configs/tasks names
            task_files([task])
        else:
            resolve_task(task)


def test_an_unknown_task_is_a_usage_error_naming_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`head` and `check` with a task that does not exist: exit 2, the known names in the message
    (`probe` and `embed`: tests/federation/test_release.py; the run's `-c eval-tasks` is refused at launch)."""
    with pytest.raises(UnknownTask, match=r"'onset_t2d' is unknown \(known names: cad, copd, hypertension, t2d"):
        resolve_task("onset_t2d")
    assert coordinator_main(["provision", str(tmp_path / "fed")]) == 0
    assert coordinator_main(["head", str(tmp_path / "fed"), "--model", "m", "--tasks", "onset_t2d", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "onset_t2d" in err and "t2d" in err.split("known names:")[1] and "internal error" not in err
    (tmp_path / "site").mkdir()
    assert client_main(["check", str(tmp_path / "site"), "--tasks", "onset_t2d"]) == 2
    err = capsys.readouterr().err
    assert "onset_t2d" in err and "known: cad, copd, hypertension, t2d" in err
