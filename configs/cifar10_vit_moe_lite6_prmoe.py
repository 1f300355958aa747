"""The published PR-MoE ViT-Lite-6/4 recipe on CIFAR-10 (90.66% top-1): the number to beat.

Launch: torchrun --nproc_per_node=N -m moesaic train --config configs/cifar10_vit_moe_lite6_prmoe.py
"""
NAME = "cifar10_vit_moe_lite6_prmoe"
MODEL = "vit_moe_lite6_prmoe"  # experts [4, 4, 8] on blocks 1, 3, 5; residual MLP; top-1; jitter
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
CROP_PADDING = 4
AUTO_AUGMENT = "cifar10"
MAX_EP_SIZE = 1
CHECKPOINT_EVERY = 10
