"""The project's XLA:CPU default (`xla_defaults`): added unless the user chose, switched off or
the jaxlib is one it was not measured with; who runs convolutions, read back from the flags."""

import subprocess
import sys

import pytest

from xmodal_jax import xla_defaults


@pytest.fixture(autouse=True)
def _jax_not_started(monkeypatch):
    """`apply` as at the start of a process: this test process has run JAX already."""
    monkeypatch.setattr(xla_defaults, "_backend_started", lambda: False)


def test_added_to_the_users_flags(monkeypatch):
    monkeypatch.setattr(xla_defaults, "_jaxlib_measured", lambda: True)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_defaults.apply(env)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_defaults.FLAG}"
    assert xla_defaults.cpu_convolutions(env) == "xla"
    assert not xla_defaults.apply(env)  # once
    empty = {}
    assert xla_defaults.apply(empty) and empty["XLA_FLAGS"] == xla_defaults.FLAG


@pytest.mark.parametrize(
    "env",
    [
        {"XLA_FLAGS": f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}"},  # the user's choice
        {"XMODAL_XLA_DEFAULTS": "off"},
        {"XMODAL_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    ],
)
def test_left_alone(monkeypatch, env):
    monkeypatch.setattr(xla_defaults, "_jaxlib_measured", lambda: True)
    before = dict(env)
    assert not xla_defaults.apply(env) and env == before
    assert xla_defaults.cpu_convolutions(env) == "ynnpack"


def test_not_added_for_another_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_defaults.importlib.metadata, "version", lambda name: "0.12.0")
    env = {}
    assert not xla_defaults.apply(env) and env == {}


@pytest.mark.parametrize(
    "flags, who",
    [
        ("", "ynnpack"),
        (f"{xla_defaults.NAME}=-{xla_defaults.CONVOLUTIONS}", "xla"),
        (f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}", "ynnpack"),
        (f"{xla_defaults.NAME}=LIBRARY_FUSION_TYPE_DOT", "xla"),  # the list itself, no convs
        (f"{xla_defaults.NAME}=LIBRARY_FUSION_TYPE_DOT,{xla_defaults.CONVOLUTIONS}", "ynnpack"),
        (f"{xla_defaults.FLAG} {xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}", "ynnpack"),
    ],
)
def test_cpu_convolutions_reads_the_last_setting(flags, who):
    assert xla_defaults.cpu_convolutions({"XLA_FLAGS": flags}) == who


def _fresh_process(code: str, **env: str) -> list[str]:
    """The output lines of `code` run in a new Python with a bare environment plus `env`."""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **env}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split("\n")


def test_the_flag_reaches_xla_and_takes_convolutions_from_ynnpack():
    """In a fresh process: `import xmodal_jax` before JAX starts puts the flag in, XLA accepts
    it (an unknown flag would stop it), and a compiled convolution is no YNNPACK fusion."""
    code = (
        "import os; import xmodal_jax, jax, jax.numpy as jnp\n"
        "dims = ('NHWC', 'HWIO', 'NHWC')\n"
        "f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID', "
        "dimension_numbers=dims))\n"
        "x, w = jnp.ones((8, 28, 28, 3)), jnp.ones((5, 5, 3, 20))\n"
        "print(os.environ.get('XLA_FLAGS', ''))\n"
        "print('ynn' in f.lower(x, w).compile().as_text())\n"
    )
    out = _fresh_process(code)
    assert out[0] == xla_defaults.FLAG and out[1] == "False"
    out = _fresh_process(code, XMODAL_XLA_DEFAULTS="off")  # XLA's default: YNNPACK runs it
    assert out[1] == "True"


def test_left_alone_once_jax_has_started():
    """Imported after a JAX computation, the flag could no longer take effect: `XLA_FLAGS`
    keep saying what XLA runs with."""
    code = (
        "import os, jax.numpy as jnp; jnp.ones(1)\n"
        "import xmodal_jax; from xmodal_jax import xla_defaults\n"
        "print(repr(os.environ.get('XLA_FLAGS', ''))); print(xla_defaults.cpu_convolutions())\n"
    )
    out = _fresh_process(code)
    assert out[:2] == ["''", "ynnpack"]
