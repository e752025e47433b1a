"""The pod-scale COCO configs run for 2 steps on mock data with tiny towers on 8 devices
(mesh data x fsdp = 1 x 8: FSDP-sharded parameters, the loss in `shard_map`).

TFDS's own `coco_captions` builder needs TensorFlow to even describe its features (an optional
extra here), so the mock data comes from a stand-in builder with the same feature names and
types (`image`, `image/id`, `captions/{id, text}`)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from xmodal_jax import config as config_lib
from xmodal_jax.train import trainer

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


class CocoCaptionsStandin(tfds.core.GeneratorBasedBuilder):
    """`coco_captions`' features, without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        captions = tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()})
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": np.int64,
            "captions": captions,
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples() for s in ("train", "val", "test")}

    def _generate_examples(self):
        yield from ()


@pytest.mark.parametrize(  # LiT and SigLIP (the same sharded path) in the slow tier
    "name",
    ["clip_coco", *(pytest.param(n, marks=pytest.mark.slow) for n in ("lit_coco", "siglip_coco"))],
)
def test_coco_config_two_steps_on_mock_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    c = config_lib.load(f"{EXPERIMENTS}/{name}.py:batch_size=16,steps=2,image_size=32")
    assert c.mesh.fsdp == 8 and c.model.loss.sharded
    assert c.model.image.tower == "vit_b16" and c.model.text.tower == "bert_base"
    # Tiny towers in place of ViT-B/16 and BERT-base.
    c.model.image.overrides = {"patch_size": 8, "image_size": 32, "width": 16, "depth": 1}
    c.model.image.overrides.update(num_heads=2, mlp_dim=32)
    c.model.text.overrides = {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
    c.model.embed_dim = 8
    c.data.name = "coco_captions_standin"
    c.evals.retrieval.dataset = "coco_captions_standin"
    c.eval_batch_size = 8
    c.lr_schedule.warmup_steps = 1
    with tfds.testing.mock_data(num_examples=24):
        result = trainer.train_and_evaluate(c, str(tmp_path / "wd"))
    for k in ("i2t_R@1", "t2i_R@5", "i2t_R@10"):
        assert 0.0 <= result[f"eval/retrieval/{k}"] <= 1.0
    cached = list((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(cached) == (2 if name == "lit_coco" else 0)  # LiT: train and test features
