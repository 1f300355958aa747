"""WideNet ("Go Wider Instead of Deeper") on CIFAR-10: one attention and one top-2 MoE
feed-forward shared by all 6 blocks, per-block LayerNorms. Written as a config() function
returning the typed config (the other style a config file may use)."""
from moesaic.train import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        name="cifar10_widenet",
        model="widenet_cifar",
        dataset="cifar10",
        batch_size=512,
        eval_batch_size=1000,
        epochs=200,
        lr=2e-3,
        weight_decay=5e-2,
        wd_exclude_norm_bias_embed=True,
        warmup_epochs=20,
        label_smoothing=0.1,
        aux_loss_weight=0.01,
        clip_grad=1.0,
        crop_padding=4,
        hflip=True,
        auto_augment="cifar10",
        checkpoint_every=10,
    )
