"""Zero-shot under a domain shift with test-time adaptation: TENT on the locked image tower.

    xmodal train --workdir workdirs/shift_tent_fog_3 \
        --config experiments/animals/shift_tent.py:corruption=fog,severity=3

`shift_source_only.py` (the quick start trained on clean images) evaluated on the corrupted test
split with TENT (`evaluators.zeroshot_tent`): per head, online over the test images it is scored
on, the MobileNetV2 tower's BatchNorm layers normalise with each batch's statistics and their
scales and biases take one optimiser step per batch on the entropy of the head's zero-shot logits
(class-name anchors fixed); predictions are made before each update. The test-time setting:
the unseen columns adapt on the stream of unseen-class test images, unlabelled; report it in
its own row. Evaluators: `shift_seen_tent`, `shift_unseen_tent`, `shift_unseen_control_tent`
(the permuted-names heads, adapted the same way), and the clean `val_pseudo_unseen`. No GZSL:
its seen-class penalty is calibrated on a fixed model, and an online model is not one.

`statistics=source` is the variant that keeps the tower's running (ImageNet) statistics and
adapts only the BN scales and biases: the quick start's heads were trained on the tower's
inference-mode features, which batch statistics move away from (on clean test images, batch
statistics alone take the seen-class accuracy far down), so both rows are reported, neither
chosen over the other. `source_bn=True,split=k` (`shift_source_only.py`) starts TENT from the
tower on the silhouettes' own statistics, those its heads were trained with; `statistics=source`
then keeps them as TENT's normalisation.

TENT's options are the official code's defaults (Adam, lr 1e-3, batch 128, one step per batch,
not episodic; repo DequanWang/tent, `conf.py`, whose CIFAR-10-C config `cfgs/tent.yaml` raises
the batch to 200); `lr`, `optimizer` ('adam' or 'sgd'), `tent_batch`, `tent_steps` (steps per
batch; `tent_steps=0`: the normalisation alone, no update) and `episodic` change them (`steps`
stays the quick start's training steps). None is tuned: no target label may tune them. The image
tower runs in the evaluation (about 13,000 forward and backward passes of MobileNetV2 at 112 px
per run for the 5 splits), so a run costs minutes on 2 CPU cores, unlike the cached source-only
run."""

from experiments.animals.shift_source_only import shift_config

TENT_DEFAULTS = dict(
    lr=1e-3, optimizer="adam", tent_batch=128, tent_steps=1, episodic=False, statistics="batch"
)


def get_config(arg=None):
    c, args = shift_config(arg, **TENT_DEFAULTS)
    tent = {
        "type": "zeroshot_tent",
        "lr": float(args.lr),
        "optimizer": args.optimizer,
        "steps": int(args.tent_steps),
        "episodic": bool(args.episodic),
        "batch_size": int(args.tent_batch),
        "statistics": args.statistics,
    }
    shifted = {k: c.evals.shift_unseen[k] for k in ("dataset", "split", "pp")}
    c.evals = {
        "shift_seen_tent": {**tent, **shifted, "classes": "seen"},
        "shift_unseen_tent": {**tent, **shifted, "classes": "unseen"},
        "shift_unseen_control_tent": {**tent, **shifted, "classes": "unseen", "heads": "control"},
        "val_pseudo_unseen": c.evals.val_pseudo_unseen.to_dict(),
    }
    return c
