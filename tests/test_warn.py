"""jmp_ext.warn.warn_user: a warning at the first frame outside jmp_ext, ASE and torch."""

import warnings

import pytest

from jmp_ext.warn import warn_user


def _call_through(module_names: list[str]):
    """A chain of functions, the first defined in a module named module_names[0], ..., the last
    calling warn_user; returns the outermost."""
    inner = warn_user
    for name in reversed(module_names):
        namespace = {"__name__": name, "inner": inner}
        exec("def call(message):\n    inner(message)\n", namespace)
        inner = namespace["call"]
    return inner


@pytest.mark.parametrize("chain", [["jmp_ext.train.loop"], ["ase.calculators.calculator", "jmp_ext.calculator",
                                                             "torch.utils._contextlib", "jmp_ext.train.inference"]])
def test_the_warning_names_the_callers_line(chain):
    call = _call_through(chain)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call("hello")  # (this line)
    assert [(w.filename, str(w.message)) for w in caught] == [(__file__, "hello")]


def test_a_frame_of_another_package_is_the_users():
    for name in ("numpy.core", "jmp_extra"):  # (jmp_extra: not jmp_ext)
        call = _call_through([name, "jmp_ext.train.loop"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call("hi")
        assert [(w.filename, w.lineno) for w in caught] == [("<string>", 2)]  # (the outer exec'd function)


def test_a_frame_whose_name_is_not_a_string_is_passed_as_the_users():
    """(warn_user called .partition on it: an AttributeError instead of a warning)"""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _call_through([None, "jmp_ext.train.loop"])("hi")


def test_only_rank_0_of_a_process_group_warns(monkeypatch):
    """Every rank ran the same checks: 2 ranks printed each warning twice. A process outside a
    process group warns whatever RANK says (a user's own script may set it)."""
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "1")
    for initialized, rank, expected in ((False, 1, ["hello"]), (True, 1, []), (True, 0, ["hello"])):
        monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_user("hello")
        assert [str(w.message) for w in caught] == expected


def test_the_command_lines_print_a_warning_as_such(tmp_path):
    """Under the CLIs a warning came as "/.../jmp_ext/train/__main__.py:45: UserWarning: ..."
    and the CLI's own source line, which say nothing to the user."""
    import os
    import subprocess
    import sys

    from ase.build import molecule

    import ase.io

    ase.io.write(tmp_path / "bare.extxyz", [molecule("H2O"), molecule("NH3")])  # (no labels: a warning)
    done = subprocess.run([sys.executable, "-m", "jmp_ext.data", "convert", str(tmp_path / "bare.extxyz"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert lines and all(line.startswith("warning: ") for line in lines), done.stderr
    assert "UserWarning" not in done.stderr and "convert(" not in done.stderr
