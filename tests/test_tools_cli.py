import subprocess
import sys

from tools.__main__ import COMMANDS


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tools", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    out = _run("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


def test_unknown_command_fails_clearly():
    out = _run("no_such_command")
    assert out.returncode != 0
    assert "unknown command 'no_such_command'" in out.stderr


def test_every_command_is_importable_and_documented():
    from tools.__main__ import _load

    for name in COMMANDS:
        fn = _load(name)
        assert callable(fn) and fn.__doc__ and len(fn.__doc__.strip()) > 20, name
