"""An improved recipe for the same PR-MoE ViT-Lite-6/4: RandAugment, mixup/cutmix, horizontal
flip, and no weight decay on norms, biases and embeddings (plus a higher weight decay on the
rest, as is usual with heavy augmentation). Same model, same epochs and batch as the published
recipe, so the two runs compare like for like.
"""
from cifar10_vit_moe_lite6_prmoe import MODEL_ARGS, NORM_STD  # the same model and input scaling

NAME = "cifar10_vit_moe_lite6_prmoe_improved"
MODEL = "vit_moe_lite6_prmoe"
DATASET = "cifar10"
BATCH_SIZE = 512
EVAL_BATCH_SIZE = 1000
EPOCHS = 200
LR = 2e-3
MIN_LR = 1e-5
WEIGHT_DECAY = 5e-2
WD_EXCLUDE_NORM_BIAS_EMBED = True
WARMUP_EPOCHS = 10
SCHEDULE = "cosine"
LABEL_SMOOTHING = 0.1
AUX_LOSS_WEIGHT = 0.01
CLIP_GRAD = 1.0
CROP_PADDING = 4
HFLIP = True
RANDAUG_OPS = 2
RANDAUG_MAGNITUDE = 9
MIXUP_ALPHA = 0.8
CUTMIX_ALPHA = 1.0
MIX_PROB = 1.0
MIX_SWITCH_PROB = 0.5
MAX_EP_SIZE = 1
CHECKPOINT_EVERY = 10
