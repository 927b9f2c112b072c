import pytest
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


def test_boolean_flags_read_as_people_write_them():
    from common.io import DataError
    from tools.__main__ import typed_flags

    seen = []

    def command(out: str = "x", n4: bool = True, require_label=False):
        seen.append((n4, require_label))

    run = typed_flags(command)
    for text, expected in (("false", False), ("FALSE", False), ("no", False), ("0", False), ("True", True),
                           ("yes", True), ("1", True)):
        run(n4=text)
        assert seen[-1][0] is expected, text
    run(n4=False, require_label=1)
    assert seen[-1] == (False, True)
    with pytest.raises(DataError, match="--n4: expects true or false"):
        run(n4="maybe")


def test_a_user_error_prints_one_line_and_exits_1(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tools", "datalist", "--root", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "d.json"), "--progress", "no"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and "missing: dataset folder does not exist" in lines[-1], proc.stderr


def test_a_bad_flag_through_fire_prints_one_line_naming_it(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tools", "datalist", "--root", str(tmp_path), "--out",
                           str(tmp_path / "p" / "d.json"), "--progress", "maybe"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: --progress: expects true or false (yes/no, 1/0), got 'maybe'"
    assert not (tmp_path / "p").exists()
