"""The defaults every experiment config starts from: the official DeiT/Vim ImageNet recipe (vim_spec.md §5).

Config files in `configs/` call `imagenet_config(...)` and change what their experiment needs; every
field can also be overridden on the command line (`--config.optim.lr=1e-3`).
"""

from __future__ import annotations

import ml_collections


def imagenet_config(
  model_name: str, *, batch_size: int = 1024, drop_path_rate: float = 0.0
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = model_name
  # ModelConfig overrides (vim_jax.models.vim.ModelConfig fields).
  c.model = ml_collections.ConfigDict(
    dict(drop_path_rate=drop_path_rate, dtype="bfloat16", scan_impl=ml_collections.config_dict.placeholder(str))
  )
  c.init_from = ""  # official .pth or vim_jax model directory to start from (fine-tuning)
  c.init_from_required = False  # fine-tuning configs refuse to start from scratch
  c.init_pos_embed_quirk = False  # resize pos_embed like the official fine-tuning code (§1.3)

  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.repeated_aug = 3  # RASampler, 3 repeats
  c.data.num_workers = 16
  c.data.prefetch = 4

  c.aug = ml_collections.ConfigDict()
  c.aug.scale = (0.08, 1.0)
  c.aug.ratio = (3 / 4, 4 / 3)
  c.aug.hflip = 0.5
  c.aug.randaugment = "rand-m9-mstd0.5-inc1"
  c.aug.re_prob = 0.25
  c.aug.eval_crop_ratio = 0.875

  c.mixup = ml_collections.ConfigDict(
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)
  )

  c.batch_size = batch_size  # global
  c.eval_batch_size = 1024
  c.num_epochs = 300.0
  c.total_steps = 0  # 0 = num_epochs × steps per epoch
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4  # base lr, scaled by batch_size / 512 unless unscale_lr
  c.optim.unscale_lr = False
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_lr = 1e-6
  c.optim.min_lr = 1e-5
  c.optim.per_epoch_schedule = False  # True: the official per-epoch (off-by-one) timm schedule
  c.optim.weight_decay = 0.05
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_grad = ml_collections.config_dict.placeholder(float)  # None = no clipping (official)
  c.ema_decay = 0.99996  # 0 = no EMA

  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))  # devices per parameter shard; the rest is data parallel
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0 = once per epoch
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  return c


def stride8_finetune_config(model_name: str, arg: str | None) -> ml_collections.ConfigDict:
  """The official long-sequence fine-tuning (ft-vim-*.sh, §5.3): stride 8, 30 epochs, lr 1e-5, wd 1e-8.

  `official`: resize pos_embed with the official quirk (§1.3) and use the per-epoch schedule.
  """
  args = parse_arg(arg, runlocal=False, official=False)
  config = imagenet_config(model_name, batch_size=1024, drop_path_rate=0.0)
  config.init_from_required = True
  config.num_epochs = 30.0
  config.optim.lr = 5e-6  # -> 1e-5 after scaling by 1024 / 512
  config.optim.warmup_lr = 1e-5
  config.optim.min_lr = 1e-5
  config.optim.weight_decay = 1e-8
  if args.official:
    config.init_pos_embed_quirk = True
    config.optim.per_epoch_schedule = True
  if args.runlocal:
    shrink_for_local_run(config)
  return config


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`--config=configs/tiny.py:runlocal,official` -> ConfigDict(runlocal=True, official=True, ...).

  Flags named in `defaults` only; `name=value` takes the default's type, a bare name means True.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, _, value = item.partition("=")
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r}; expected one of {sorted(defaults)}")
    parsed[name] = type(defaults[name])(value) if value else True
  return parsed


def use_digits(c: ml_collections.ConfigDict, image_size: int) -> ml_collections.ConfigDict:
  """Switch to the embedded scikit-learn digits (offline), with augmentation fit for 8×8 digits:
  crops and light mixup only (no flips, RandAugment or erasing, which destroy digits)."""
  c.data.update(dict(name="digits", image_size=image_size, repeated_aug=1, num_workers=0))
  c.aug.update(dict(scale=(0.6, 1.0), hflip=0.0, randaugment="", re_prob=0.0))
  c.mixup.update(dict(mixup_alpha=0.2, cutmix_alpha=0.0))
  return c


def shrink_for_local_run(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`:runlocal`: the experiment's model family, 2 layers, on the embedded digits, for a laptop CPU.

  A smoke test of the whole trainer (augmentation, mixup, EMA, checkpoints), not a result.
  """
  use_digits(c, image_size=32)
  c.model.update(dict(depth=2, dtype="float32", patch_size=8, stride=8))
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = 10
  c.log_every_steps = 2
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 5
  return c
