"""PR-MoE ViT-Lite-6/4 upcycled from a trained dense ViT-Lite-6/4 (sparse upcycling): every
expert and residual MLP of blocks 1, 3, 5 starts as that block's dense MLP, the routers start
anew, and training continues for a quarter of the dense run's epochs.

First train the dense model (configs/cifar10_vit_lite6.py), then:

    DATA=/path/to/cifar python3 -m moesaic train \
        --config configs/cifar10_vit_moe_lite6_prmoe_upcycled.py \
        --set init_from=runs/cifar10_vit_lite6/<timestamp>

The model is the zoo preset as registered (no MODEL_ARGS), so that its non-MoE weights have the
dense baseline's shapes; the published recipe's Titans details (qkv and patch biases, mean
pooling, ...) would need a dense run with the same details. Not run here (no GPU, no CIFAR-10):
the schedule is a starting point, a shorter warmup and lower peak learning rate than training
from scratch, as is usual when continuing from trained weights.
"""
NAME = "cifar10_vit_moe_lite6_prmoe_upcycled"
MODEL = "vit_moe_lite6_prmoe"
UPCYCLE = True  # with init_from (--set init_from=...): copy the dense MLPs into the experts
DATASET = "cifar10"
BATCH_SIZE = 512
EVAL_BATCH_SIZE = 1000
EPOCHS = 50
LR = 1e-3
WEIGHT_DECAY = 3e-2
WARMUP_EPOCHS = 5
LABEL_SMOOTHING = 0.1
AUX_LOSS_WEIGHT = 0.01
CLIP_GRAD = 1.0
CROP_PADDING = 4
AUTO_AUGMENT = "cifar10"
MAX_EP_SIZE = 1
CHECKPOINT_EVERY = 10
