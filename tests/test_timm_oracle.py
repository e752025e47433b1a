"""timm ViTs against timm itself: small random models built by timm, saved as users get them
(hub folders from `timm.models.save_for_hf`: `config.json` + `model.safetensors`; a bare state
dict converted with `--arch`), converted with `xmodal convert`, loaded with `pretrained.load`
and run on the inputs timm was run on. timm runs only in the oracle subprocess
(`timm_oracle.py`, which explains why); it is an oracle, never imported by the package.

Tolerance: pooled features and logits within 1e-4 of timm's, relative to the largest value
(float32 rounding).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from jax_testing import jit_apply

from xmodal_jax import main as cli
from xmodal_jax import pretrained
from xmodal_jax.transfer import convert
from xmodal_jax.transfer.torch_layout import ConversionError

HERE = os.path.dirname(os.path.abspath(__file__))
REL = 1e-4


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    out = tmp_path_factory.mktemp("timm")
    subprocess.run([sys.executable, os.path.join(HERE, "timm_oracle.py"), str(out)], check=True)
    with open(out / "oracle.json") as f:
        record = json.load(f)
    record["dir"] = out
    record["ref"] = {n: dict(np.load(out / f"{n}.npz")) for n in record["cases"]}
    return record


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _convert_and_compare(oracle, case, tmp_path, *args):
    """`xmodal convert` the case's weights, `pretrained.load` them, and compare with timm."""
    src = str(oracle["dir"] / oracle["cases"][case]["src"])
    dst = str(tmp_path / f"{case}.safetensors")
    assert cli.main(["convert", src, dst, *args]) == 0
    vision = pretrained.load(dst)
    ref = oracle["ref"][case]
    out = jit_apply(vision.module, vision.variables, ref["images"])
    assert _rel_err(out["pooled"], ref["pooled"]) <= REL
    assert _rel_err(out["logits"], ref["logits"]) <= REL
    return vision


@pytest.mark.parametrize("case", ["tiny_hub", "narrow_hub", "avg_hub"])
def test_hub_folders_match_timm(tmp_path, oracle, case):
    vision = _convert_and_compare(oracle, case, tmp_path)
    spec = oracle["cases"][case]
    assert vision.module.num_heads == spec["heads"] and vision.module.width == spec["width"]
    assert vision.module.pool == ("gap" if case == "avg_hub" else "cls")
    # preprocessing from timm's pretrained_cfg (these sizes' tags use 0.5 mean and std)
    with open(oracle["dir"] / case / "config.json") as f:
        pre_cfg = json.load(f)["pretrained_cfg"]
    assert vision.mean == tuple(pre_cfg["mean"]) and vision.std == tuple(pre_cfg["std"])
    assert vision.crop_fraction == pre_cfg["crop_pct"] and vision.image_size == 32
    assert vision.interpolation == pre_cfg["interpolation"]


def test_bare_state_dict_with_arch_matches_timm(tmp_path, oracle):
    """Width 96 with 12 heads of 8: the head count comes from `--arch vit_b16`."""
    vision = _convert_and_compare(oracle, "bare_pth", tmp_path, "--arch", "vit_b16")
    assert vision.module.num_heads == 12 and vision.module.width == 96


def _one_line_error(capsys, src, dst, *args) -> str:
    assert cli.main(["convert", src, dst, *args]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal: error: ") and "\n" not in err
    return err


def test_unreadable_heads_are_one_line_errors(tmp_path, oracle, capsys):
    dst = str(tmp_path / "out.safetensors")
    bare = str(oracle["dir"] / oracle["cases"]["bare_pth"]["src"])
    # no config.json and no --arch: never a guess from the width
    err = _one_line_error(capsys, bare, dst)
    assert "heads of this timm ViT (width 96) is not in its tensors" in err and "--arch" in err
    # a config.json whose model name is not a size in our table, without model_args
    folder = tmp_path / "unknown_size"
    folder.mkdir()
    shutil.copy(bare, folder / "model.pth")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_so400m_patch14_224"}))
    err = _one_line_error(capsys, str(folder), dst)
    assert "config.json names 'vit_so400m_patch14_224', not a timm ViT size" in err
    # a size whose width is not the file's
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    err = _one_line_error(capsys, str(folder), dst)
    assert "names 'vit_tiny_patch16_224' (width 192) but the weights are 96 wide" in err
    # a pooling our ViT does not take from these tensors
    args = {"embed_dim": 96, "num_heads": 12, "global_pool": "map"}
    cfg = {"architecture": "vit_base_patch16_224", "model_args": args}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="global_pool='map' is not supported"):
        convert.convert(str(folder), dst)
    assert not os.path.exists(dst)
