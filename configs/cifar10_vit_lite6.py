"""Dense baseline: ViT-Lite-6/4 (Compact Transformers) on CIFAR-10, with the published MoE
recipe's hyper-parameters so the dense and MoE runs compare like for like."""
NAME = "cifar10_vit_lite6"
MODEL = "vit_lite6"
DATASET = "cifar10"
BATCH_SIZE = 512
EVAL_BATCH_SIZE = 1000
EPOCHS = 200
LR = 2e-3
WEIGHT_DECAY = 3e-2
WARMUP_EPOCHS = 40
LABEL_SMOOTHING = 0.1
AUX_LOSS_WEIGHT = 0.0  # dense: no MoE layers
CLIP_GRAD = 1.0
CROP_PADDING = 4
AUTO_AUGMENT = "cifar10"
CHECKPOINT_EVERY = 10
