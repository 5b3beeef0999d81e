r"""The offline demo: a small Vim trained on the 1,797 handwritten digits that ship with scikit-learn.

  python -m vim_jax.train --config=configs/demo.py --workdir=runs/demo      (or: make demo)

The same trainer as ImageNet (augmentation, mixup/cutmix, AdamW, EMA, orbax checkpoints, resume),
with a 4-layer Vim on 16×16 images (patch 4: 16 tokens + cls). Hardware: one CPU core is enough.
Expected: 96% top-1 on the 300 held-out digits in 1 min 4 s to 1 min 19 s on 2 CPU cores (measured; a test
checks ≥ 90%).
"""

from vim_jax import config_base


def get_config(arg=None):
  del arg
  config = config_base.imagenet_config("vim_tiny", batch_size=64, drop_path_rate=0.0)
  config.model.update(dict(patch_size=4, stride=4, embed_dim=64, depth=4, d_state=8, dtype="float32"))
  config_base.use_digits(config, image_size=16)
  config.eval_batch_size = 64
  config.num_epochs = 15.0
  config.optim.lr = 2e-3
  config.optim.warmup_epochs = 1.0
  config.optim.weight_decay = 0.05
  config.ema_decay = 0.99
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  return config
