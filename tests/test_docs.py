"""The docs' commands match the code: every `--flag` a documented `python -m adaserve_jax...`
or `python serve.py` command passes is defined by that command's own source (its module, or a
package's `__main__.py`)."""

from __future__ import annotations

import functools
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md", "SIMULATION.md")
COMMAND = re.compile(r"python (?:-m (adaserve_jax(?:\.\w+)*)|(serve\.py))")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def documented_commands(text: str) -> list[tuple[str, str]]:
    """(module or script, argument text) for every command in a markdown text. In a fenced
    block a command ends at a line end not continued by a backslash; elsewhere (an inline code
    span, which may wrap over lines) at the closing backtick."""
    out = []
    for m in COMMAND.finditer(text):
        rest = text[m.end() :]
        fenced = text.count("```", 0, m.start()) % 2 == 1
        end = re.search(r"`|(?<!\\)\n" if fenced else "`", rest)
        out.append((m.group(1) or m.group(2), rest[: end.start() if end else None]))
    return out


@functools.cache
def source_of(target: str) -> str:
    if target == "serve.py":
        return (ROOT / "serve.py").read_text()
    path = ROOT.joinpath(*target.split("."))
    if path.is_dir():  # `python -m package` runs its __main__
        return (path / "__main__.py").read_text()
    return path.with_suffix(".py").read_text()


def test_parser_finds_commands_and_flags():
    text = "run `python -m adaserve_jax.sim.validate R.json\n--jitter cell` then\n" + (
        "```\npython serve.py --port 1 \\\n  --policy x\nother --not-this\n```"
    )
    cmds = documented_commands(text)
    assert [c for c, _ in cmds] == ["adaserve_jax.sim.validate", "serve.py"]
    assert FLAG.findall(cmds[0][1]) == ["--jitter"]
    assert FLAG.findall(cmds[1][1]) == ["--port", "--policy"]


@pytest.mark.parametrize("doc", DOCS)
def test_documented_flags_exist(doc):
    commands = documented_commands((ROOT / doc).read_text())
    assert commands, f"{doc} documents no command"
    missing = sorted(
        {
            (target, flag)
            for target, args in commands
            for flag in FLAG.findall(args)
            if f'"{flag}"' not in source_of(target)
        }
    )
    assert not missing, f"{doc} passes flags its commands do not define: {missing}"
