r"""Vim-B on ImageNet-1k, 300 epochs. The official repository has no Vim-B script (its issue #13); this
uses the paper's recipe (batch 1024, lr 1e-3 after scaling, wd 0.05) with drop path 0.1 and FSDP.

  python -m vim_jax.train --config=configs/base.py --workdir=runs/vim_base \
      --config.data.data_dir=/path/to/tensorflow_datasets

Hardware: 8+ GPUs or a TPU slice; parameters and optimizer state are split over `mesh.fsdp` devices.
Expected: 81.9% top-1 (the released Vim-B; not yet reproduced here). Time: not measured yet.
Arguments: `runlocal`.
"""

from vim_jax import config_base


def get_config(arg=None):
  args = config_base.parse_arg(arg, runlocal=False)
  config = config_base.imagenet_config("vim_base", batch_size=1024, drop_path_rate=0.1)
  config.mesh.fsdp = 8
  config.model.remat = True
  if args.runlocal:
    config_base.shrink_for_local_run(config)
    config.mesh.fsdp = 1
  return config
