r"""Long-sequence fine-tuning of Vim-S: patch stride 8 (730 tokens at 224²), 30 epochs at lr 1e-5, wd 1e-8.

  python -m vim_jax.train --config=configs/small_stride8_ft.py --workdir=runs/vim_small_stride8 \
      --config.init_from=vim_s_midclstok_80p5acc.pth --config.data.data_dir=/path/to/tensorflow_datasets

`init_from` is a stride-16 checkpoint: an official .pth (converted on the fly, head kept) or a vim_jax
model directory (e.g. runs/vim_small/best). Its 14×14 position embedding is resized to 27×27.
Hardware: 8 GPUs (global batch 1024, as ft-vim-s.sh). Expected: 81.6% top-1 (the released Vim-S†;
not yet reproduced here).
Arguments: `official` = resize pos_embed with the official code's quirk (vim_spec.md §1.3), as the
released stride-8 weights were initialised, and the per-epoch schedule; `runlocal`.
"""

from vim_jax import config_base


def get_config(arg=None):
  return config_base.stride8_finetune_config("vim_small_stride8", arg)
