"""The published PR-MoE ViT-Lite-6/4 recipe on CIFAR-10 (90.66% top-1): the number to beat.

ColossalAI-Examples' image/moe run (config.py, train.py) with the model of Titans' ViTMoE:
MODEL_ARGS give that model's details on top of the zoo preset (dropout 0.1 everywhere, biased
qkv and patch projections, mean of all tokens into a zero-initialised head, LayerNorm eps 1e-6,
router weights truncated-normal with std sqrt(0.1 / d_model), jitter on the router logits;
drop_rate also drops inside every expert's MLP, after the activation), and that run's input
normalisation (the widely copied CIFAR-10 std (0.2023, 0.1994, 0.2010), not the training set's
own (0.2470, 0.2435, 0.2616)). Its experts and residual MLP each drop their own output before
the two are mixed (dropout_branches; moesaic's default drops the mixed output).

Launch: torchrun --nproc_per_node=N -m moesaic train --config configs/cifar10_vit_moe_lite6_prmoe.py
"""
NAME = "cifar10_vit_moe_lite6_prmoe"
MODEL = "vit_moe_lite6_prmoe"  # experts [4, 4, 8] on blocks 1, 3, 5; residual MLP; top-1; jitter
MODEL_ARGS = {"drop_rate": 0.1, "qkv_bias": True, "patch_bias": True, "pool": "mean",
              "zero_head": True, "norm_eps": 1e-6, "router_init_std": (0.1 / 256) ** 0.5,
              "noise_policy": "logit_jitter", "dropout_branches": True}
DATASET = "cifar10"
BATCH_SIZE = 512  # global, over all ranks
EVAL_BATCH_SIZE = 1000
EPOCHS = 200
LR = 2e-3
WEIGHT_DECAY = 3e-2
WARMUP_EPOCHS = 40
SCHEDULE = "cosine"  # stepped per optimizer step
LABEL_SMOOTHING = 0.1
AUX_LOSS_WEIGHT = 0.01
CLIP_GRAD = 1.0
NORM_STD = (0.2023, 0.1994, 0.2010)  # that run's torchvision Normalize (mean as moesaic's)
CROP_PADDING = 4
AUTO_AUGMENT = "cifar10"
MAX_EP_SIZE = 1
CHECKPOINT_EVERY = 10
