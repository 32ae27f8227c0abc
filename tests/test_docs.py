"""Every command in the README and the docs pages works as written: each `python <script>.py ...`,
`python -m <module> ...` and `torchrun ... <script>.py ...` line of their code blocks runs here with
`--help` appended, so the script or module must exist where the command says, and every flag it
writes must be one of that script's options with a value of the right type (the parser reads them
all before it reaches --help). In this process: a second each, not a subprocess's imports."""
import glob
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
NOT_OURS = {"pip", "venv", "pytest", "torch.distributed.run"}  # commands of other tools in the same lines
ENDS = {">", ">>", "2>&1", "...", "2>", "<"}  # where a command's own words end


def commands(page):
    """(script or module, flags, the line) for each of our commands in `page`'s code blocks."""
    text = open(os.path.join(ROOT, page)).read()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.search(r"\b(python3?|torchrun) ", line):
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words, parts = list(lexer), [[]]
            for w in words:  # one command between && ; | and the like
                if w in ("&&", ";", "||", "|", "&"):
                    parts.append([])
                else:
                    parts[-1].append(w)
            for words in parts:
                starts = [i for i, w in enumerate(words) if w in ("python", "python3", "torchrun")]
                if not starts:
                    continue
                rest = words[starts[0] + 1:]
                if words[starts[0]] == "torchrun":
                    rest = rest[next(i for i, w in enumerate(rest) if w.endswith(".py")):]
                if rest[:1] == ["-m"]:
                    target, rest = rest[1], rest[2:]
                elif rest and rest[0].endswith(".py"):
                    target, rest = rest[0], rest[1:]
                else:
                    continue  # python -c ..., or python alone
                if target in NOT_OURS:
                    continue
                flags = []
                for w in rest:
                    if w in ENDS or w.startswith(">"):
                        break
                    flags.append(w)
                found.append((target, flags, line.strip()))
    return found


ALL = [(page, *c) for page in PAGES for c in commands(page)]


def test_the_pages_hold_the_commands_a_user_runs():
    targets = {t for _, t, _, _ in ALL}
    assert {"train_ddpo.py", "train_alignprop.py", "train_prdp.py", "sample.py", "experiments.compare",
            "experiments.bench", "experiments.evaluate", "shapes.build", "shapes.measure"} <= targets, targets
    # the first command of the README is the main job, as written
    assert commands("README.md")[0][:2] == ("train_ddpo.py", ["--explore"])


@pytest.mark.parametrize("page, target, flags, line", ALL, ids=[f"{p}:{t} {' '.join(f)}"[:90] for p, t, f, _ in ALL])
def test_each_command_runs_its_help(page, target, flags, line, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [target, *flags, "--help"])
    with pytest.raises(SystemExit) as e:
        if target.endswith(".py"):
            assert os.path.exists(os.path.join(ROOT, target)), f"{page}: no {target} ({line})"
            runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
        else:
            monkeypatch.delitem(sys.modules, target, raising=False)  # as `python -m` runs it: not imported yet
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    assert e.value.code in (0, None), f"{page}: `{line}` -> {e.value}"
    assert "options" in capsys.readouterr().out


def test_a_wrong_command_fails_here():
    # what the test above catches: a moved script, an unknown flag, a value of the wrong type
    for target, flags in (("compare.py", []), ("train_ddpo.py", ["--epoch=3"]), ("train_ddpo.py", ["--epochs=x"])):
        with pytest.raises((SystemExit, FileNotFoundError)) as e:
            argv = [target, *flags, "--help"]
            old, sys.argv = sys.argv, argv
            try:
                runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
            finally:
                sys.argv = old
        assert not (isinstance(e.value, SystemExit) and e.value.code in (0, None)), target
