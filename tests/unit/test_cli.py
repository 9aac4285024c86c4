"""The CLI: every command parses and shows help, and errors are one readable line."""

import subprocess
import sys

import pytest

from jobs import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_top_level_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out


def test_error_is_one_line_with_hint_and_verbose_shows_traceback(tmp_path):
    missing = tmp_path / "nope.json"
    cmd = [sys.executable, "-m", "jobs.cli", "convert", "--coco", str(missing),
           "--images", str(tmp_path), "--out", str(tmp_path / "out")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode != 0
    lines = [line for line in quiet.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "nope.json" in lines[0] and "--verbose" in lines[0]
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run(cmd[:3] + ["--verbose"] + cmd[3:], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_top_level_help_speaks_to_users_and_version_exists(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "instance segmentation" in out and "The three jobs:" in out
    for job in ("train", "infer", "distill"):
        assert f"\n  {job} " in out  # described in the opening text, not only listed
    assert "module in jobs" not in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"maskray {cli.version()}"
    from importlib.metadata import version

    assert cli.version() == version("maskray")
