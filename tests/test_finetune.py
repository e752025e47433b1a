"""The `finetune` task (pretrained start + transfer regulariser) against float64 numpy, and the
`experiments/animals/finetune_*.py` configs.

Most tests use a tiny ViT saved as a converted checkpoint (a "pretrained" model that compiles in
seconds); the ImageNet MobileNetV2 of the configs is checked for its starting point and rules
without compiling a train step.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmodal_jax import config as config_lib
from xmodal_jax import evaluators, pretrained, tasks
from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.tasks import finetune
from xmodal_jax.train import optim, trainer
from xmodal_jax.train import step as step_lib
from xmodal_jax.transfer import checkpoint_io, rule_plans
from xmodal_jax.transfer import rules as rules_lib
from xmodal_jax.tree_paths import flatten_with_paths

ANIMALS = os.path.join(os.path.dirname(__file__), "..", "experiments", "animals")
CONFIGS = ("none", "l2sp", "delta", "bss", "linear_probe", "llrd", "gradual")
TINY_VIT = {"patch_size": 4, "image_size": 16, "width": 16, "depth": 1, "num_heads": 2}
TINY_ARG = "image_size=16,per_class=8,steps=2,batch_size=16"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny ViT with a 7-class head, saved like `xmodal convert` output."""
    model = zoo.build("vit_ti16", num_classes=7, mlp_dim=32, **TINY_VIT)
    x = np.zeros((1, 16, 16, 3), np.float32)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(7), x))
    variables = jax.tree.map(
        lambda v: v + 0.1 * jax.random.normal(jax.random.key(8), v.shape), variables
    )
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny_vit.safetensors")
    meta = {"arch": "vit_ti16", "overrides": {"num_classes": 7, "mlp_dim": 32, **TINY_VIT}}
    checkpoint_io.save(path, variables, meta)
    return path


def tiny_config(config: str, ckpt: str, **regularizer):
    """Config `config` with the tiny ViT in place of MobileNetV2 and a small data slice."""
    c = config_lib.load(f"{ANIMALS}/finetune_{config}.py:{TINY_ARG}")
    c.model = {"name": "vit_ti16", "num_classes": 10, "mlp_dim": 32, **TINY_VIT}
    c.pretrained.name = ckpt
    c.evals.test.split = "test[:2%]"
    c.eval_batch_size = 40
    if c.regularizer.name == "delta":
        c.regularizer.layers = ("embedding",)
        c.regularizer.head_steps = 20
    if c.get("unfreeze"):  # the MobileNetV2 block regexes, as steps on the ViT's parts
        c.unfreeze = [(1, "encoder/.*|norm/.*"), (2, "embedding/.*|cls|pos_embedding")]
    if regularizer:
        c.regularizer = regularizer
    return c


def f64(x):
    return np.asarray(x, np.float64)


def np_xent(logits, labels):
    z = f64(logits)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), np.asarray(labels)].mean()


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def capture(model, variables, images, rng, train, layer="embedding"):
    """Outputs and the `layer` output of `model`, computed here independently of the task."""

    def run(variables, images, rng):
        kwargs = {"rngs": {"dropout": rng}} if rng is not None else {}
        return model.apply(
            variables,
            images,
            train=train,
            capture_intermediates=lambda m, method: method == "__call__" and m.name == layer,
            mutable=["intermediates"],
            **kwargs,
        )

    out, state = jax.jit(run)(variables, images, rng)  # one compile, not one per op
    return out, state["intermediates"][layer]["__call__"][0]


@functools.partial(jax.jit, static_argnames=("scale", "seed"))
def perturbed(params, scale=0.05, seed=3):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


CASES = {
    "none": {"name": "none"},
    "l1": {"name": "l1", "weight": 0.003},
    "l2": {"name": "l2", "weight": 0.02},
    "l2sp": {"name": "l2sp", "alpha": 0.3, "beta": 0.05},
    "delta": {"name": "delta", "weight": 0.7, "layers": ("embedding",)},
    "delta_attention": {
        "name": "delta",
        "weight": 0.7,
        "layers": ("embedding",),
        "attention": True,
        "attention_batches": 2,
        "head_steps": 50,
    },
    "bss": {"name": "bss", "weight": 1.0, "k": 4},
}


_TASKS = {}


def built_task(ckpt: str, case: str):
    """The task of `CASES[case]` on the tiny ViT, built once per test session."""
    if (ckpt, case) not in _TASKS:
        _TASKS[ckpt, case] = tasks.build(tiny_config("none", ckpt, **CASES[case]))
    return _TASKS[ckpt, case]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_is_xent_plus_weighted_regularizer(case, tiny_ckpt, tfds_dir):
    reg = CASES[case]
    task = built_task(tiny_ckpt, case)
    batch = next(task.train_iterator(0, 1))
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    params = perturbed(variables.pop("params"))
    rng = jax.random.key(5)
    loss, (_, metrics) = jax.jit(task.loss)(params, variables, batch, rng, 0.0)

    # Independent reference: the model's outputs, the pretrained weights from pretrained.load.
    out, fmap = capture(task.model, {"params": params}, batch["image"], rng, train=True)
    xent = np_xent(out["logits"], batch["label"])
    flat = {p: f64(v) for p, v in flatten_with_paths(params).items()}
    kernels = [v for p, v in flat.items() if p.endswith("kernel")]
    loaded = pretrained.load(tiny_ckpt).variables["params"]
    w0 = {p: f64(v) for p, v in flatten_with_paths(loaded).items()}
    if reg["name"] == "none":
        want = 0.0
    elif reg["name"] == "l1":
        want = reg["weight"] * sum(np.abs(k).sum() for k in kernels)
    elif reg["name"] == "l2":
        want = reg["weight"] * 0.5 * sum((k**2).sum() for k in kernels)
    elif reg["name"] == "l2sp":
        sp = sum(((v - w0[p]) ** 2).sum() for p, v in flat.items() if not p.startswith("head/"))
        head = sum((v**2).sum() for p, v in flat.items() if p.startswith("head/"))
        want = reg["alpha"] * 0.5 * sp + reg["beta"] * 0.5 * head
    elif reg["name"] == "delta":
        start = {**loaded, "head": params["head"]}  # the head does not reach the feature map
        _, fmap0 = capture(task.model, {"params": start}, batch["image"], None, train=False)
        d = f64(fmap) - f64(fmap0)
        per_channel = (d**2).reshape(d.shape[0], -1, d.shape[-1]).mean(1)  # [B, C]
        weights = np.ones(d.shape[-1])
        if reg.get("attention"):
            weights = d.shape[-1] * f64(task.attention["embedding"])
        want = reg["weight"] * 0.5 * (per_channel * weights).sum(1).mean()
    else:
        s = np.linalg.svd(f64(out["pooled"]), compute_uv=False)
        want = reg["weight"] * (s[-reg["k"] :] ** 2).sum()
    np.testing.assert_allclose(float(metrics["regularizer"]), want, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(loss), xent + want, rtol=2e-5, atol=1e-7)
    if reg["name"] != "none":
        assert want > 1e-5  # the case exercises a non-trivial term


def test_delta_attention_is_filter_ablation_of_the_pretrained_model(tiny_ckpt, tfds_dir):
    reg = CASES["delta_attention"]
    task = built_task(tiny_ckpt, "delta_attention")
    it = task.train_iterator(0, 1)
    batches = [next(it) for _ in range(reg["attention_batches"])]
    loaded = pretrained.load(tiny_ckpt).variables["params"]
    params = {**loaded, "head": task.attention_head}
    apply = jax.jit(lambda p, x: task.model.apply({"params": p}, x))
    c = loaded["embedding"]["kernel"].shape[-1]
    increase = np.zeros(c)
    for b in batches:
        base = np_xent(apply(params, b["image"])["logits"], b["label"])
        for j in range(c):
            kernel = np.array(loaded["embedding"]["kernel"])
            kernel[..., j] = 0.0
            zeroed = {**params, "embedding": {**params["embedding"], "kernel": kernel}}
            logits = apply(zeroed, b["image"])["logits"]
            increase[j] += (np_xent(logits, b["label"]) - base) / len(batches)
    want = np_softmax((increase - increase.mean()) / increase.std() / 5.0)
    got = task.attention["embedding"]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-5)
    # The fitted head separates the pretrained features better than chance on its batches.
    feats = np.concatenate([apply(params, b["image"])["pooled"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    head = task.attention_head
    logits = feats @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
    assert np_xent(logits, labels) < np.log(10)


def test_l2sp_is_zero_at_the_start_and_the_head_gets_beta_only(tiny_ckpt, tfds_dir):
    c = tiny_config("l2sp", tiny_ckpt, name="l2sp", alpha=0.3, beta=0.0)
    task = tasks.build(c)
    batch = next(task.train_iterator(0, 1))
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    params = variables.pop("params")
    params = {**params, "head": perturbed(params["head"])}  # a non-zero new head
    _, (_, metrics) = jax.jit(task.loss)(params, variables, batch, jax.random.key(1), 0.0)
    assert float(metrics["regularizer"]) == 0.0 and float(metrics["reg/sp"]) == 0.0

    c.regularizer.beta = 0.05
    task = tasks.build(c)

    @jax.jit
    def reg(p):
        return task.loss(p, variables, batch, jax.random.key(1), 0.0)[1][1]["regularizer"]

    head = {k: f64(v) for k, v in params["head"].items()}
    want = 0.05 * 0.5 * sum((v**2).sum() for v in head.values())
    np.testing.assert_allclose(float(reg(params)), want, rtol=1e-5)
    grads = flatten_with_paths(jax.jit(jax.grad(reg))(params))
    for path, g in grads.items():
        if path.startswith("head/"):
            np.testing.assert_allclose(g, 0.05 * head[path.split("/")[1]], rtol=1e-5, atol=1e-8)
        else:
            assert float(jnp.abs(g).max()) == 0.0, path


def test_start_is_the_pretrained_weights_and_stays_constant(tiny_ckpt, tfds_dir):
    c = tiny_config("l2sp", tiny_ckpt)
    c.total_steps = 3
    task = tasks.build(c)
    tx, lr_fn = optim.build(c)
    it = task.train_iterator(0, 1)
    batch = next(it)
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    params = variables.pop("params")
    loaded = {
        p: np.asarray(v)
        for p, v in flatten_with_paths(pretrained.load(tiny_ckpt).variables["params"]).items()
    }
    flat = flatten_with_paths(params)
    assert flat["head/kernel"].shape == (16, 10) and loaded["head/kernel"].shape == (16, 7)
    for path, value in flat.items():
        if not path.startswith("head/"):
            np.testing.assert_array_equal(value, loaded[path], err_msg=path)
    assert set(task.start_params) == {p for p in loaded if not p.startswith("head/")}

    state = step_lib.TrainState(
        jnp.int32(0),
        params,
        variables,
        jax.jit(tx.init)(params),
        jax.random.key_data(jax.random.key(1)),
    )
    # The optimiser state holds the momentum of the trained parameters (and step counters), no
    # copy of the starting point.
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert 0 <= sum(x.size for x in jax.tree.leaves(state.opt_state)) - n_params < 100
    step = jax.jit(step_lib.make_train_step(task, tx, lr_fn, c.total_steps))
    alpha, beta = c.regularizer.alpha, c.regularizer.beta
    for _ in range(3):
        before = {p: f64(v) for p, v in flatten_with_paths(state.params).items()}
        state, metrics = step(state, batch)
        sp = sum(
            ((v - loaded[p]) ** 2).sum() for p, v in before.items() if not p.startswith("head/")
        )
        head = sum((v**2).sum() for p, v in before.items() if p.startswith("head/"))
        np.testing.assert_allclose(
            float(metrics["train/regularizer"]),
            alpha * 0.5 * sp + beta * 0.5 * head,
            rtol=1e-4,
            atol=1e-9,
        )
        batch = next(it)
    assert float(metrics["train/regularizer"]) > 0.0  # the backbone has moved from the start
    for path, value in task.start_params.items():
        np.testing.assert_array_equal(value, loaded[path])


def test_mobilenet_start_is_imagenet_mobilenet_v2(tfds_dir):
    c = config_lib.load(f"{ANIMALS}/finetune_l2sp.py:image_size=16,per_class=8")
    task = tasks.build(c)
    ref = pretrained.load("mobilenet-v2-imagenet").variables
    ref_params = flatten_with_paths(ref["params"])
    assert set(task.start_params) == {p for p in ref_params if not p.startswith("head/")}
    for path, value in task.start_params.items():
        np.testing.assert_array_equal(value, ref_params[path], err_msg=path)
    for path, value in flatten_with_paths(ref["batch_stats"]).items():
        np.testing.assert_array_equal(task.start_state["batch_stats"][path], value)
    abstract = jax.eval_shape(task.init, jax.random.key(0), next(task.train_iterator(0, 1)))
    assert nn.unbox(abstract)["params"]["head"]["kernel"].shape == (1280, 10)


def test_stratified_subset_is_balanced_and_seeded(tfds_dir):
    labels = np.repeat(np.arange(4), [5, 7, 6, 9])
    idx = finetune.stratified_subset(labels, 3, seed=0)
    assert len(set(idx)) == 12 and np.bincount(labels[idx]).tolist() == [3, 3, 3, 3]
    np.testing.assert_array_equal(idx, finetune.stratified_subset(labels, 3, seed=0))
    assert not np.array_equal(idx, finetune.stratified_subset(labels, 3, seed=1))
    with pytest.raises(UserError, match="class 0 has only 5"):
        finetune.stratified_subset(labels, 6, seed=0)


def test_bad_regularizer_config_is_one_clear_error(tiny_ckpt, tfds_dir):
    with pytest.raises(
        UserError,
        match=r"'l2_sp' is unknown; use one of \['bss', 'delta', 'l1', 'l2', 'l2sp', 'none'\]",
    ):
        finetune.regularizer_options({"name": "l2_sp"})
    with pytest.raises(UserError, match=r"unknown keys \['alhpa'\]"):
        finetune.regularizer_options({"name": "l2sp", "alhpa": 0.1})
    with pytest.raises(UserError, match="not found: \\['blok6'\\]"):
        tasks.build(tiny_config("none", tiny_ckpt, name="delta", layers=("blok6",)))


def _mobilenet_leaves():
    model = zoo.build("mobilenet_v2", num_classes=10)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return [(p, x.shape) for p, x in rule_plans.named_leaves(abstract["params"])]


def test_config_rules_on_mobilenet_v2(tfds_dir):
    named = _mobilenet_leaves()
    plans = {}
    for name in CONFIGS:
        c = config_lib.load(f"{ANIMALS}/finetune_{name}.py")
        assert c.pretrained.name == "mobilenet-v2-imagenet" and c.data.per_class == 80
        assert c.evals.test.split == "test" and c.seed == 0
        r, _ = rules_lib.from_config(c)
        plans[name] = dict(zip([p for p, _ in named], rule_plans.plan(r, named), strict=True))
    head, stem, top = "head/kernel", "stem_conv/kernel", "last_conv/kernel"
    lr = lambda name, p: float(plans[name][p].lr.max())
    assert lr("none", head) == 1.0 and lr("none", stem) == pytest.approx(0.1)
    probe = plans["linear_probe"]
    assert {p for p, plan in probe.items() if not plan.frozen} == {"head/kernel", "head/bias"}
    assert lr("llrd", top) == 1.0 and lr("llrd", "block17_dw_conv/kernel") == pytest.approx(0.8)
    assert lr("llrd", "block1_dw_conv/kernel") == pytest.approx(0.8**17)
    unlock = {p: int(plan.unlock.max()) for p, plan in plans["gradual"].items()}
    assert unlock[head] == 0 and unlock[top] == 30 and unlock["block14_expand_conv/kernel"] == 30
    assert unlock["block13_project_conv/kernel"] == 60 and unlock["block7_dw_conv/kernel"] == 60
    assert unlock["block6_project_conv/kernel"] == 90 and unlock[stem] == 90


# l2sp: the next test; the regularisers' and rules' own checks are above, so most configs'
# end-to-end steps are in the slow tier.
QUICK_CONFIGS = ("none", "llrd")


@pytest.mark.parametrize(
    "name",
    [
        n if n in QUICK_CONFIGS else pytest.param(n, marks=pytest.mark.slow)
        for n in CONFIGS
        if n != "l2sp"
    ],
)
def test_config_takes_two_steps_and_evaluates(name, tiny_ckpt, tfds_dir):
    c = tiny_config(name, tiny_ckpt)
    task = tasks.build(c)
    tx, _ = optim.build(c)
    it = task.train_iterator(0, 1)
    batch = next(it)
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    params = variables.pop("params")
    opt_state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, opt_state, model_state, batch, rng):
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (model_state, metrics)), grads = grad_fn(params, model_state, batch, rng, 0.0)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, model_state, loss, metrics

    for i in range(2):
        params, opt_state, variables, loss, metrics = step(
            params, opt_state, variables, batch, jax.random.key(i)
        )
        assert np.isfinite(float(loss)) and np.isfinite(float(metrics["regularizer"]))
        batch = next(it)
    evals = evaluators.build_all(c, task.predict_fns(), mesh_lib.make_mesh(c.mesh))
    results = evaluators.run_all(evals, {"params": params, **variables})
    assert 0.0 <= results["eval/test/accuracy"] <= 1.0


def test_trainer_writes_test_accuracy_and_regularizer(tiny_ckpt, tfds_dir, tmp_path):
    """The l2sp config through the trainer: two steps, then `eval/test/accuracy`."""
    summary = trainer.train_and_evaluate(tiny_config("l2sp", tiny_ckpt), str(tmp_path))
    assert 0.0 <= summary["eval/test/accuracy"] <= 1.0
    with open(tmp_path / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    logged = {k for line in lines for k in line}
    assert {"train/regularizer", "train/reg/sp", "train/xent", "eval/test/accuracy"} <= logged
