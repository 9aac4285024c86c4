"""Every command in the README works: its flags exist, and the cheap ones run on tiny data.

Commands are read from the README's ```bash blocks. `make` lines are checked against the
Makefile's targets; `maskray …` / `python -m jobs.…` lines are checked by parsing them with the
real CLI parser (unknown flags fail), and the data commands (synth, convert, pack) actually run,
in order, in a temporary folder with their image counts shrunk.
"""

import re
import shlex
from pathlib import Path

import pytest

from jobs import cli

ROOT = Path(__file__).resolve().parents[2]
CHEAP = {"synth", "convert", "pack"}


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def maskray_argv(words: list[str]) -> list[str] | None:
    """The CLI argv of a README line, or None when it is not a maskray command."""
    if words[:1] == ["maskray"]:
        return words[1:]
    if len(words) > 2 and words[:2] == ["python", "-m"] and words[2].startswith("jobs."):
        module = words[2]
        names = [n for n, (m, _) in cli.COMMANDS.items() if m == module]
        return [names[0], *words[3:]] if names else None
    return None


def test_readme_opens_with_the_two_setup_commands():
    first = readme_commands()[:2]
    assert first == [["make", "demo"], ["make", "test"]]


def test_make_targets_in_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, flags=re.M))
    for words in readme_commands():
        if words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w):
                assert target in targets, f"README runs `make {target}`, which the Makefile lacks"


def test_every_maskray_command_in_readme_parses():
    parser = cli.build_parser()
    seen = 0
    for words in readme_commands():
        argv = maskray_argv(words)
        if argv is None:
            continue
        if "--" in argv:  # `maskray submit … -- train …`: the job part is checked on its own
            split = argv.index("--")
            inner = argv[split + 1:]
            parser.parse_args(inner)
            argv = argv[:split + 1] + inner
        parser.parse_args(argv)  # raises SystemExit on an unknown command or flag
        seen += 1
    assert seen >= 5


def test_readme_data_commands_run_on_tiny_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    for words in readme_commands():
        argv = maskray_argv(words)
        if not argv or argv[0] not in CHEAP or any("s3://" in w for w in argv):
            continue
        shrunk = []
        for i, word in enumerate(argv):
            if i and argv[i - 1] in ("--images", "--unlabeled") and word.isdigit():
                word = "3"
            shrunk.append(word)
        assert cli.invoke(shrunk) == 0, shrunk
        ran.append(argv[0])
    assert set(ran) == CHEAP
