r"""Vim-S on ImageNet-1k, 300 epochs: the paper's recipe (pt-vim-s.sh: batch 512, lr 1e-3, drop path 0.05).

  python -m vim_jax.train --config=configs/small.py --workdir=runs/vim_small \
      --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: written for 8 GPUs (global batch 512 = the official 8×64). Expected: 80.5% top-1 (the released
Vim-S; not yet reproduced here). Time: not measured yet.
Arguments: `official` = the per-epoch learning-rate schedule of the official scripts; `runlocal`.
"""

from vim_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False, official=False)
  config = config_base.imagenet_config("vim_small", batch_size=512, drop_path_rate=0.05)
  config.optim.lr = 1e-3  # scaled by 512 / 512
  if args.official:
    config.optim.per_epoch_schedule = True
  if args.runlocal:
    config_base.shrink_for_local_run(config)
  return config
