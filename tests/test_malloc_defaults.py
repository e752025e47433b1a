"""The allocator setting of the `xmodal` program (`malloc_defaults`): added to the user's glibc
tunables unless the user chose, switched off, or the C library or kernel could not use it; the
program restarts itself once to take it."""

import subprocess
import sys

import pytest

from xmodal_jax import __version__, main, malloc_defaults

GLIBC, THP = (2, 36), "madvise"
VERSION = f"xmodal {__version__}"


def test_added_to_the_users_tunables():
    env = malloc_defaults.with_defaults({"PATH": "/bin"}, GLIBC, THP)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    theirs = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    env = malloc_defaults.with_defaults(theirs, GLIBC, "always")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert theirs == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}  # a copy, not changed
    assert malloc_defaults.with_defaults(env, GLIBC, THP) is None  # once


@pytest.mark.parametrize(
    "env, glibc, thp",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, THP),  # the user's choice
        ({"XMODAL_MALLOC_DEFAULTS": "off"}, GLIBC, THP),
        ({"XMODAL_MALLOC_DEFAULTS": "0"}, GLIBC, THP),
        ({}, (2, 34), THP),  # the tunable came with glibc 2.35
        ({}, None, THP),  # musl or another C library
        ({}, GLIBC, "never"),  # the kernel gives no huge pages
        ({}, GLIBC, None),  # no transparent huge pages at all
    ],
)
def test_left_alone(env, glibc, thp):
    assert malloc_defaults.with_defaults(env, glibc, thp) is None


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", None),
    ],
)
def test_thp_mode_is_the_bracketed_one(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert malloc_defaults.thp_mode(str(path)) == mode
    assert malloc_defaults.thp_mode(str(tmp_path / "absent")) is None


def _program(code: str, **env: str) -> list[str]:
    """The output lines of `code` run as a program (python -c) in a bare environment + `env`."""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **env}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


# Prints the tunables it starts with, then runs the `xmodal` program (`--version`), which
# restarts the process (printing again) where the setting applies.
PROGRAM = (
    "import os, sys\n"
    "print('tunables', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
    "from xmodal_jax import main\n"
    "sys.argv = ['xmodal', '--version']\n"
    "main.cli()\n"
)


def test_the_program_restarts_once_with_the_setting():
    applies = malloc_defaults.with_defaults(
        {}, malloc_defaults.glibc_version(), malloc_defaults.thp_mode()
    )
    lines = _program(PROGRAM)
    if applies:
        assert lines == ["tunables None", "tunables glibc.malloc.hugetlb=1", VERSION]
    else:
        assert lines == ["tunables None", VERSION]
    # switched off, or the user's own setting: no restart
    assert _program(PROGRAM, XMODAL_MALLOC_DEFAULTS="off") == ["tunables None", VERSION]
    own = _program(PROGRAM, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert own == ["tunables glibc.malloc.hugetlb=0", VERSION]


def test_the_console_script_is_the_program():
    """`xmodal` (the console script) enters through `cli`, which takes the setting; `main`,
    which the tests call in their own process, never restarts it."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "xmodal"]
    assert script.value == "xmodal_jax.main:cli" and script.load() is main.cli
