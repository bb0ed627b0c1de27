"""The README's shell blocks paste and run as they are: no comment after a `\\` continuation (the
backslash then escapes a space, the comment ends the command and the next line runs on its own),
and no continued line followed by an empty or comment-only line."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# A backslash, blanks, then a comment: the continuation is broken.
COMMENT_AFTER_CONTINUATION = re.compile(r"\\\s+#")


def bash_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The ```bash blocks of a Markdown text: (line number of the first line, lines)."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and line.strip() == "```bash":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    assert current is None, f"README.md: the ```bash block from line {start} is not closed"
    return blocks


def continuation_problems(start: int, lines: list[str]) -> list[str]:
    """Where a block's `\\` continuations break when pasted into a shell."""
    problems = []
    for offset, line in enumerate(lines):
        number = start + offset
        if COMMENT_AFTER_CONTINUATION.search(line):
            problems.append(f"line {number}: a comment after a `\\` continuation: {line.strip()}")
        if line.endswith("\\"):
            following = lines[offset + 1] if offset + 1 < len(lines) else ""
            if not following.strip() or following.lstrip().startswith("#"):
                problems.append(
                    f"line {number}: continued by `\\` into an empty or comment-only line"
                )
    return problems


def test_the_readme_has_bash_blocks():
    assert len(bash_blocks(README.read_text(encoding="utf-8"))) >= 5


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (["a \\", "    --b 1 \\   # the b", "    --c"], ["line 2: a comment after"]),
        (["a \\", "# a comment", "b"], ["line 1: continued by"]),
        (["a \\", "", "b"], ["line 1: continued by"]),
        (["a \\"], ["line 1: continued by"]),
        (["a \\", "    --b 1   # fine: the last line", "c  # fine"], []),
        (["echo 'a \\ # b'"], ["line 1: a comment after"]),  # conservative, never in the README
    ],
)
def test_the_check_finds_broken_continuations(block, expected):
    problems = continuation_problems(1, block)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected, strict=True):
        assert problem.startswith(fragment), problem


def test_every_readme_bash_block_pastes_as_it_is():
    problems = [
        problem
        for start, lines in bash_blocks(README.read_text(encoding="utf-8"))
        for problem in continuation_problems(start, lines)
    ]
    assert not problems, "README.md:\n" + "\n".join(problems)


def test_every_readme_bash_block_is_valid_shell():
    """`bash -n` parses each block as pasted (quotes and continuations balanced)."""
    for start, lines in bash_blocks(README.read_text(encoding="utf-8")):
        completed = subprocess.run(
            ["bash", "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True
        )
        assert completed.returncode == 0, f"README.md block at line {start}: {completed.stderr}"


def test_readme_robustbench_commands_parse_with_the_current_flags(capsys):
    """Every `robustbench-mat` command of a bash block, joined across its continuations, is
    accepted by the command's parser without a deprecation message."""
    from robustbench_mat.cli import build_parser

    parser, parsed = build_parser(), 0
    for start, lines in bash_blocks(README.read_text(encoding="utf-8")):
        for line in "\n".join(lines).replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] != ["robustbench-mat"]:
                    continue
                words = words[1 : words.index(">")] if ">" in words else words[1:]
                parser.parse_args(words)
                assert capsys.readouterr().err == "", (start, part)
                parsed += 1
    assert parsed >= 15


def test_every_registered_method_and_dataset_has_a_table_row() -> None:
    """The methods and datasets tables name every built-in plugin: a new one is documented."""
    from robustbench_mat.registry import BUILT_IN, DATASETS, METHODS

    rows = {
        match.group(1)
        for match in re.finditer(r"^\| `([a-z0-9-]+)` \|", README.read_text(), re.MULTILINE)
    }
    plugins = [info for registry in (METHODS, DATASETS) for info in registry]
    built_in = {info.name for info in plugins if info.source == BUILT_IN}
    assert sorted(built_in - rows) == []
