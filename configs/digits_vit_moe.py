"""The embedded default (what `moesaic train` runs with no config): a small ViT-MoE on the 1,797
8x8 handwritten digits scikit-learn ships; about 30-40 s on 2 quiet CPU cores (measured runs in
docs/benchmarks.md), 98.61% best test accuracy at the default seed."""
NAME = "digits_vit_moe"
MODEL = "vit_moe_tiny"
MODEL_ARGS = {}  # vit_moe_tiny as registered: depth 4, d_model 64, 4 heads, 4 experts, top-1
DATASET = "digits"
BATCH_SIZE = 64
EVAL_BATCH_SIZE = 360
EPOCHS = 30
LR = 2e-3
WEIGHT_DECAY = 0.05
WD_EXCLUDE_NORM_BIAS_EMBED = True
WARMUP_EPOCHS = 1
LABEL_SMOOTHING = 0.1
AUX_LOSS_WEIGHT = 0.01
CLIP_GRAD = 1.0
CHECKPOINT_EVERY = 10
THREADS = 1  # one thread for now; to be re-measured on a quiet machine (docs/training.md)
