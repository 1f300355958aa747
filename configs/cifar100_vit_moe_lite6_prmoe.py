"""The PR-MoE ViT-Lite-6/4 recipe of cifar10_vit_moe_lite6_prmoe.py on CIFAR-100 (100 fine
classes): the same model and schedule; inputs normalised by CIFAR-100's own training-set
statistics. No published MoE number exists for it to compare with.

Launch: DATA=/path torchrun --nproc_per_node=N -m moesaic train --config configs/cifar100_vit_moe_lite6_prmoe.py
Fine-tune a CIFAR-10 run instead of starting anew: --set init_from=runs/cifar10_.../<timestamp>
"""
from cifar10_vit_moe_lite6_prmoe import *  # noqa: F401,F403  (the recipe, beside this file)

NAME = "cifar100_vit_moe_lite6_prmoe"
DATASET = "cifar100"
NORM_STD = None  # CIFAR-100's own statistics
