r"""Vim-Ti on ImageNet-1k, 300 epochs: the paper's recipe (DeiT augmentation, AdamW, EMA).

  python -m vim_jax.train --config=configs/tiny.py --workdir=runs/vim_tiny \
      --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: written for 8 GPUs (global batch 1024, as the official 8×128); runs on any device count that
divides the batch. Expected: 76.1% top-1 (the released Vim-Ti; not yet reproduced here). Time: with the
XLA scan, measured 205–210 images/s per H100 (experiments/results), 300 epochs take about 64 hours on 8.
Arguments (after `:`): `official` = the official pt-vim-t.sh exactly (weight decay 0.1 and the
per-epoch learning-rate schedule); `runlocal` = a 2-layer smoke run on the embedded digits data.
"""

from vim_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False, official=False)
  config = config_base.imagenet_config("vim_tiny", batch_size=1024, drop_path_rate=0.0)
  if args.official:
    config.optim.weight_decay = 0.1
    config.optim.per_epoch_schedule = True
  if args.runlocal:
    config_base.shrink_for_local_run(config)
  return config
