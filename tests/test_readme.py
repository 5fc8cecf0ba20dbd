"""The README's shell examples run as written on a fresh clone (issue #16).

How README.md's fenced blocks are read
--------------------------------------
* A fenced ```bash block holds commands a reader runs in order, in one shell, from the root of a
  fresh clone; the blocks follow one another (a later block may use what an earlier one wrote,
  e.g. the store ``acts/`` or the run ``runs/default``). Any other fence (```text, ```console,
  ```python, ...) is not run.
* An HTML comment on the line right before the fence (blank lines between are allowed) adjusts
  the block; clauses are separated by ``;``:

      <!-- readme-test: skip (why) -->
          the block is not run (a Hugging Face hub model, GPUs, several nodes);
      <!-- readme-test: PREFIX += ARGS -->
          ARGS are appended to every command that starts with PREFIX: the small sizes the README
          names next to the block (argparse keeps a flag's last value, so ``--steps 100``
          overrides a ``--steps 20000`` written in the command);
      <!-- readme-test: PREFIX -> skip (why) -->
          the commands that start with PREFIX are not run.

* ``pip install ... &&`` at the start of a command is dropped: CI has installed the package and
  its ``dev`` extra already, and this test never installs anything.
* Commands are cut at ``&&`` and ``;``, an unquoted `` #`` comment is dropped, backslash-continued lines are
  joined, and each block runs as one ``bash -e`` script.

test_readme_commands_are_well_formed (fast) checks every ```bash block, skipped ones included:
each command starts with a known program, and every ``--flag`` given to ``python -m fastxc.train``,
``python -m fastxc[.]<cmd>``, ``fastxc <cmd>`` or ``torchrun`` (its own flags and those after
``-m fastxc.train``) exists in that command's parser, so a renamed flag fails without the slow run.

test_readme_shell_blocks_run (slow: 13.5 min on 2 cores, about 6 of them ``pytest bench/``) copies the repository
(``git ls-files -co --exclude-standard``, plus the built ``fastxc/_C*.so`` so that nothing is
compiled) into a temporary folder and runs the runnable blocks there in README order, with
``PYTHONPATH=<copy>`` (the installed editable package is not re-pointed), this interpreter's
folder first on ``PATH`` (``python`` and ``fastxc`` are the ones under test) and ``HOME``
unchanged, so the model organism cached under ``~/.cache/fastxc`` is reused (on a machine without
it the first block builds it: about 5 min more). It stops at the first block that fails, naming
its README line and first command and showing the tail of its output.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# programs a ```bash command may start with
KNOWN_PROGRAMS = {"python", "fastxc", "torchrun", "pytest", "pip", "cat", "ls", "head", "tail", "cd", "export"}
BLOCK_TIMEOUT_S = 15 * 60

_DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$")
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Block:
    line: int                       # README line of the opening fence (1-based)
    lang: str                       # the fence's info string
    text: str                       # the block's body
    skip: str | None = None         # why the whole block is not run
    appends: list[tuple[str, str]] = field(default_factory=list)   # (prefix, args)
    drops: list[tuple[str, str]] = field(default_factory=list)     # (prefix, why)

    @property
    def runnable(self) -> bool:
        return self.lang == "bash" and self.skip is None


def _parse_directive(text: str, where: str) -> dict:
    out = {"skip": None, "appends": [], "drops": []}
    for clause in filter(None, (c.strip() for c in text.split(";"))):
        if clause == "skip" or clause.startswith("skip ") or clause.startswith("skip("):
            out["skip"] = clause[4:].strip(" ()") or "skip"
        elif "+=" in clause:
            prefix, args = (s.strip() for s in clause.split("+=", 1))
            assert prefix and args, f"{where}: empty prefix or arguments in {clause!r}"
            out["appends"].append((prefix, args))
        elif "->" in clause:
            prefix, rest = (s.strip() for s in clause.split("->", 1))
            assert rest.startswith("skip"), f"{where}: '{clause}': only '-> skip (why)' is known"
            out["drops"].append((prefix, rest[4:].strip(" ()") or "skip"))
        else:
            raise AssertionError(f"{where}: unknown readme-test clause {clause!r}")
    return out


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README, with the readme-test comment before it applied."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"README.md:{start + 1}: unclosed ``` fence"
        block = Block(line=start + 1, lang=lang, text="\n".join(lines[start + 1:j]))
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = _DIRECTIVE.match(lines[k].strip()) if k >= 0 else None
        if d:
            for key, value in _parse_directive(d.group(1), f"README.md:{k + 1}").items():
                setattr(block, key, value)
        blocks.append(block)
        i = j + 1
    return blocks


def _strip_comment(line: str) -> str:
    """The line without an unquoted ``# comment`` (a ``#`` that starts a word)."""
    quote = None
    for n, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (n == 0 or line[n - 1].isspace()):
            return line[:n].rstrip()
    return line.rstrip()


def _split_and(line: str) -> list[str]:
    """``a && b; c`` -> [a, b, c] (``&&`` and ``;`` outside quotes and ``$(...)``)."""
    parts, quote, depth, cur, n = [], None, 0, "", 0
    while n < len(line):
        ch = line[n]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("$(", n):
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif depth == 0 and (line.startswith("&&", n) or ch == ";"):
            parts.append(cur.strip())
            cur, n = "", n + (1 if ch == ";" else 2)
            continue
        cur += ch
        n += 1
    parts.append(cur.strip())
    return [p for p in parts if p]


def block_commands(block: Block) -> list[str]:
    """The block's commands as written: continuations joined, comments and pip installs dropped."""
    logical, cur = [], ""
    for raw in block.text.splitlines():
        raw = raw.strip() if cur else raw.rstrip()  # a continuation's indent is dropped
        if raw.endswith("\\"):
            cur += raw[:-1].rstrip() + " "
            continue
        logical.append(_strip_comment(cur + raw).strip())
        cur = ""
    if cur.strip():
        logical.append(_strip_comment(cur).strip())
    cmds = []
    for line in filter(None, logical):
        parts = _split_and(line)
        while len(parts) > 1 and parts[0].startswith("pip install"):
            parts = parts[1:]  # CI installed the package: keep what follows the installs
        cmds += parts
    return cmds


def runnable_commands(block: Block) -> list[str]:
    """What the slow test runs for the block: its commands with the readme-test comment applied."""
    out = []
    for cmd in block_commands(block):
        if any(cmd.startswith(p) for p, _ in block.drops):
            continue
        for prefix, args in block.appends:
            if cmd.startswith(prefix):
                cmd = f"{cmd} {args}"
        out.append(cmd)
    return out


# ----------------------------------------------------------------------------- flag check
def command_parser(name: str):
    """The parser of ``fastxc NAME`` (``fastxc.cli.build_parser``)."""
    from fastxc.cli import build_parser

    return build_parser(name)


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _words(cmd: str) -> list[str]:
    for inner in _inner_commands(cmd):
        cmd = cmd.replace(f"$({inner})", "SUBST")
    words = shlex.split(cmd)
    while words and _ASSIGN.match(words[0]):
        words = words[1:]  # VAR=value before the program
    return words


def _inner_commands(cmd: str) -> list[str]:
    """The commands inside ``$(...)`` of a command (quotes and nested parentheses respected)."""
    found, n = [], 0
    while True:
        n = cmd.find("$(", n)
        if n < 0:
            return found
        depth, quote, m = 1, None, n + 2
        while m < len(cmd) and depth:
            ch = cmd[m]
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            m += 1
        found.append(cmd[n + 2:m - 1])
        n = m


def fastxc_invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """(fastxc command name, its arguments) when the words run one; None otherwise."""
    from fastxc.cli import COMMANDS

    if words[:1] == ["fastxc"] and len(words) > 1:
        return words[1], words[2:]
    if words[:2] == ["python", "-m"] and len(words) > 2:
        mod = words[2]
        if mod == "fastxc" and len(words) > 3:
            return words[3], words[4:]
        if mod.startswith("fastxc."):
            name = {"fastxc.eval": "eval", "fastxc.analysis.evaluate": "eval"}.get(mod, mod.split(".")[-1])
            if name in COMMANDS:
                return name, words[3:]
    return None


def check_command(cmd: str, where: str) -> list[str]:
    """Problems with one README command (an empty list: none)."""
    from fastxc.cli import COMMANDS

    problems = []
    words = _words(cmd)
    if not words:  # a plain assignment; with $(...), the program is the one inside
        return [p for c in _inner_commands(cmd) for p in check_command(c, where)]
    if words[0] not in KNOWN_PROGRAMS:
        problems.append(f"{where}: {cmd!r} starts with {words[0]!r}, not one of {sorted(KNOWN_PROGRAMS)}")
    for inner in _inner_commands(cmd):
        problems += check_command(inner, where)

    def flags_ok(name: str, args: list[str], parser, label: str):
        known = _options(parser)
        for a in args:
            if a.startswith("--"):
                flag = a.split("=", 1)[0]
                if flag not in known:
                    problems.append(f"{where}: {label} has no flag {flag} (command: {cmd})")

    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        assert "-m" in words, f"{where}: {cmd!r}: torchrun without -m"
        m = words.index("-m")
        flags_ok("torchrun", words[1:m], get_args_parser(), "torchrun")
        words = ["python"] + words[m:]
    inv = fastxc_invocation(words)
    if inv is not None:
        name, args = inv
        if name not in COMMANDS:
            problems.append(f"{where}: {cmd!r}: no fastxc command {name!r}")
        else:
            flags_ok(name, args, command_parser(name), f"fastxc {name}")
    elif words[:2] == ["python", "-m"] and words[2:3] and words[2].startswith("fastxc"):
        problems.append(f"{where}: {cmd!r}: python -m {words[2]} is not a fastxc command")
    return problems


def test_readme_directives_and_extraction():
    """The extraction itself: fences, the readme-test comment, continuations, comments, pip."""
    text = "\n".join([
        "<!-- readme-test: python -m fastxc.train += --steps 5; python -m pytest -> skip (suite) -->",
        "```bash",
        "pip install torch==2.13.0 && pip install -e . && python -m fastxc.train   # trains",
        "pip install -e '.[dev]' && python -m pytest",
        "fastxc steer --suffix \" <think>\" \\",
        "    --feature auto:x              # a comment",
        "```",
        "",
        "<!-- readme-test: skip (needs a hub model) -->",
        "",
        "```bash",
        "fastxc harvest --model-a Qwen/Qwen2.5-Math-1.5B",
        "```",
        "```python",
        "print(1)",
        "```",
    ])
    b = readme_blocks(text)
    assert [x.lang for x in b] == ["bash", "bash", "python"]
    assert [x.runnable for x in b] == [True, False, False] and b[1].skip == "needs a hub model"
    assert block_commands(b[0]) == ["python -m fastxc.train", "python -m pytest",
                                    "fastxc steer --suffix \" <think>\" --feature auto:x"]
    assert runnable_commands(b[0]) == ["python -m fastxc.train --steps 5",
                                       "fastxc steer --suffix \" <think>\" --feature auto:x"]
    assert check_command("python -m fastxc.train --stepz 3", "x") != []
    assert check_command("fastxc diff --crosscoder c --ord 2", "x") == []
    assert check_command("rm -rf runs", "x") != []
    assert check_command('ST=$(python -c "print(1)")', "x") == []


def test_readme_commands_are_well_formed():
    """Every ```bash command starts with a known program and uses only flags its parser has."""
    blocks = [b for b in readme_blocks() if b.lang == "bash"]
    assert blocks, "README.md has no ```bash block"
    problems = []
    for b in blocks:
        cmds = block_commands(b)
        assert cmds, f"README.md:{b.line}: an empty ```bash block"
        for prefix, _ in b.appends + b.drops:
            if not any(c.startswith(prefix) for c in cmds):
                problems.append(f"README.md:{b.line}: readme-test prefix {prefix!r} matches no command")
        for c in cmds:
            problems += check_command(c, f"README.md:{b.line}")
    assert not problems, "\n".join(problems)
    assert any(b.runnable for b in blocks)


# ----------------------------------------------------------------------------- the slow run
def fresh_copy(dest: Path) -> Path:
    """The repository's tracked and unignored files (as a fresh clone has them) plus the built
    C extension, copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for so in (REPO / "fastxc").glob("_C*.so"):
        shutil.copy2(so, dest / "fastxc" / so.name)
    return dest


def block_env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}  # set by this test session
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
def test_readme_shell_blocks_run(tmp_path):
    blocks = [b for b in readme_blocks() if b.runnable]
    copy = fresh_copy(tmp_path / "repo")
    env = block_env(copy)
    timings = []
    for n, b in enumerate(blocks):
        cmds = runnable_commands(b)
        script = tmp_path / f"block-{n:02d}.sh"
        script.write_text("\n".join(cmds) + "\n")
        t0 = time.perf_counter()
        try:
            r = subprocess.run(["bash", "-e", str(script)], cwd=copy, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
            rc, out = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        timings.append((b.line, cmds[0], time.perf_counter() - t0))
        assert rc == 0, (f"README.md:{b.line}: the ```bash block starting {cmds[0]!r} failed "
                         f"(exit {rc}); the script was:\n" + "\n".join(cmds)
                         + "\n--- last 4000 characters of its output ---\n" + out[-4000:])
    print("\nREADME blocks run (line, first command, seconds):")
    for line, first, s in timings:
        print(f"  README.md:{line:<5} {s:7.1f} s  {first[:90]}")
