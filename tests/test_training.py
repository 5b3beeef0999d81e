"""Training pieces: schedule, weight-decay groups, mixup, shardings on 8 fake devices, the trainer end to end."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

from vim_jax import config_base, optim, sharding, trainer
from vim_jax.data import mixup
from vim_jax.models.vim import ModelConfig, VisionMamba

REPO = Path(__file__).resolve().parents[1]


def demo_config(**overrides):
  """The demo config, shrunk to a few steps of a 2-layer model."""
  sys.path.insert(0, str(REPO / "configs"))
  import demo  # noqa: PLC0415

  config = demo.get_config()
  config.model.depth = 2
  config.total_steps = 6
  config.log_every_steps = 1
  config.eval_every_steps = 6
  config.checkpoint_every_steps = 3
  config.update_from_flattened_dict(overrides)
  return config


class TestSchedule:
  def test_official_per_epoch_schedule(self):
    """vim_spec.md §5.2: epochs 0..7 at 1e-6, 1e-6, 2.0e-4, 4.0e-4, 6.0e-4, 8.0e-4, 9.993e-4, 9.990e-4."""
    schedule = optim.lr_schedule(
      peak_lr=1e-3, total_steps=300 * 10, steps_per_epoch=10, warmup_epochs=5, per_epoch=True
    )
    lrs = [float(schedule(epoch * 10 + 3)) for epoch in range(8)]
    np.testing.assert_allclose(lrs, [1e-6, 1e-6, 2.008e-4, 4.006e-4, 6.004e-4, 8.002e-4, 9.993e-4, 9.990e-4], rtol=2e-4)
    np.testing.assert_allclose(float(schedule(299 * 10)), 1.01e-5, rtol=1e-2)

  def test_per_step_schedule(self):
    schedule = optim.lr_schedule(peak_lr=1e-3, total_steps=1000, steps_per_epoch=10, warmup_epochs=5)
    assert float(schedule(0)) == pytest.approx(1e-6)
    # The cosine runs over the whole run from epoch 0 (warmup not subtracted), as timm's does.
    assert float(schedule(49)) == pytest.approx(1e-6 + 4.9 * (1e-3 - 1e-6) / 5, rel=1e-5)
    assert float(schedule(50)) == pytest.approx(
      1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 100)), rel=1e-5
    )
    assert float(schedule(1000)) == pytest.approx(1e-5, rel=1e-3)
    assert all(float(schedule(s)) >= float(schedule(s + 10)) for s in range(50, 990, 10))

  def test_linear_scaling(self):
    assert optim.scaled_lr(5e-4, 1024) == 1e-3 and optim.scaled_lr(5e-4, 1024, unscale=True) == 5e-4


def test_weight_decay_groups_follow_timm():
  model = VisionMamba(ModelConfig(img_size=32, embed_dim=16, depth=1, num_classes=3), rngs=nnx.Rngs(0))
  mask = optim.weight_decay_mask(nnx.state(model, nnx.Param))
  flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(mask)}
  decayed = {name for name, v in flat.items() if v.get_value()}
  assert decayed == {
    "patch_embed.proj.kernel",
    "head.kernel",
    *(
      f"layers.0.mixer.{n}"
      for n in (
        "in_proj.kernel",
        "out_proj.kernel",
        "conv1d.kernel",
        "conv1d_b.kernel",
        "x_proj.kernel",
        "x_proj_b.kernel",
        "dt_proj.kernel",
        "dt_proj_b.kernel",
        "A_log",  # 2-D, so decayed, as in the official parameter groups
        "A_b_log",
      )
    ),
  }


def test_adamw_flat_or_not_equals_optax_adamw():
  """optim.adamw is optax's clipped AdamW (decay mask included), per parameter or with clipping and Adam on one
  concatenated vector; the flat gradient norm is optax's too."""
  keys = iter(jax.random.split(jax.random.key(0), 16))
  params = {"kernel": jax.random.normal(next(keys), (6, 5)), "bias": jax.random.normal(next(keys), (5,))}
  mask = {"kernel": True, "bias": False}
  reference = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=0.05, mask=mask))
  ours = [optim.adamw(1e-2, weight_decay=0.05, mask=mask, clip_grad=0.5, flatten=flat) for flat in (False, True)]
  states = [tx.init(params) for tx in (reference, *ours)]
  for _ in range(4):
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
    updates = []
    for i, tx in enumerate((reference, *ours)):
      update, states[i] = tx.update(grads, states[i], params)
      updates.append(update)
    for update in updates[1:]:
      chex.assert_trees_all_close(update, updates[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(optim.global_norm(grads, flatten=True), optax.tree.norm(grads), rtol=1e-6)
    params = optax.apply_updates(params, updates[0])


class TestBeta:
  @pytest.mark.parametrize("a, b", [(0.8, 0.8), (1.0, 1.0), (0.3, 2.5), (5.0, 0.5)])
  def test_matches_beta_distribution(self, a, b):
    """Kolmogorov–Smirnov against scipy's Beta CDF on 20000 draws (fixed keys, so no flakes)."""
    draws = jax.vmap(lambda key: mixup.beta(key, a, b))(jax.random.split(jax.random.key(3), 20_000))
    assert bool(jnp.all((draws >= 0) & (draws <= 1)))
    assert scipy.stats.kstest(np.asarray(draws, np.float64), scipy.stats.beta(a, b).cdf).pvalue > 0.01

  def test_mix_batch_has_no_loop_on_gpu(self):
    """jax.random.beta's rejection while_loop costs a host round trip per iteration on GPU; ours has none."""
    cfg = mixup.MixupConfig(num_classes=5)
    args = jax.random.key(0), jnp.zeros((2, 16, 16, 3)), jnp.zeros(2, jnp.int32)
    mix = jax.jit(lambda *args: mixup.mix_batch(*args, cfg))
    assert "stablehlo.while" not in mix.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


class TestMixup:
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jnp.arange(8) % 5

  def test_off_gives_smoothed_labels(self):
    cfg = mixup.MixupConfig(prob=0.0, num_classes=5, label_smoothing=0.1)
    images, targets = mixup.mix_batch(jax.random.key(1), self.images, self.labels, cfg)
    np.testing.assert_array_equal(images, self.images)
    np.testing.assert_allclose(targets[0], [0.92, 0.02, 0.02, 0.02, 0.02], atol=1e-6)

  def test_mixup_blends_with_mirror(self):
    cfg = mixup.MixupConfig(cutmix_alpha=0.0, num_classes=5, label_smoothing=0.0)
    images, targets = mixup.mix_batch(jax.random.key(2), self.images, self.labels, cfg)
    lam = float(targets[0, 0])  # sample 0 (class 0) is paired with sample 7 (class 2)
    assert 0 < lam < 1 and float(targets[0, 2]) == pytest.approx(1 - lam)
    np.testing.assert_allclose(images, lam * self.images + (1 - lam) * self.images[::-1], atol=1e-5)

  @pytest.mark.parametrize("seed", range(4))
  def test_cutmix_area_matches_targets(self, seed):
    cfg = mixup.MixupConfig(mixup_alpha=0.0, num_classes=5, label_smoothing=0.0)
    images, targets = mixup.mix_batch(jax.random.key(seed), self.images, self.labels, cfg)
    pasted = np.mean(np.all(np.asarray(images[0]) != np.asarray(self.images[0]), axis=-1))
    np.testing.assert_allclose(float(targets[0, 0]), 1 - pasted, atol=1e-6)
    chex.assert_trees_all_close(jnp.sum(targets, -1), jnp.ones(8), atol=1e-6)


class TestSharding:
  def test_fsdp_rule(self):
    assert sharding.param_spec((768, 1536), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.param_spec((384,), 4) == jax.sharding.PartitionSpec()
    assert sharding.param_spec((1000, 192), 8) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.param_spec((1000, 192), 1) == jax.sharding.PartitionSpec()

  @pytest.mark.parametrize("fsdp", [1, 4])
  def test_sharded_step_equals_single_device(self, fsdp):
    assert jax.device_count() == 8, "conftest sets 8 CPU devices"

    def config(fsdp_devices):
      config = demo_config(**{"mesh.fsdp": fsdp_devices, "batch_size": 16})
      config.model.update(dict(embed_dim=32, scan_impl="reference", scan_layers=True))  # the layer scan under FSDP too
      return config

    batch = {
      "image": np.random.default_rng(0).normal(size=(16, 16, 16, 3)).astype(np.float32),
      "label": np.arange(16, dtype=np.int32) % 10,
    }

    def one_step(devices):
      exp = trainer.Experiment.create(config(fsdp if len(devices) > 1 else 1), devices=devices)
      with jax.set_mesh(exp.mesh):
        state = exp.init_state()
        train_step, _ = exp.jitted()
        global_batch = sharding.global_batch(batch, exp.mesh)
        state, metrics = train_step(state, global_batch)
      return exp, state, metrics, global_batch

    exp8, state8, metrics8, batch8 = one_step(jax.devices())
    _, state1, metrics1, _ = one_step(jax.devices()[:1])
    assert batch8["image"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    kernel = state8["params"]["layers"][0]["mixer"]["in_proj"]["kernel"]
    assert kernel.sharding.spec == (sharding.param_spec(kernel.shape, fsdp))
    if fsdp > 1:
      assert kernel.sharding.spec != jax.sharding.PartitionSpec()
      assert len({s.index for s in kernel.addressable_shards}) == fsdp
    assert exp8.mesh.shape == {"data": 8 // fsdp, "fsdp": fsdp}
    np.testing.assert_allclose(float(metrics8["loss"]), float(metrics1["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(state8["params"]), jax.device_get(state1["params"]), atol=1e-5)


def test_config_arguments():
  assert config_base.parse_arg("runlocal,official", runlocal=False, official=False).official
  with pytest.raises(ValueError, match="unknown config argument 'fast'"):
    config_base.parse_arg("fast", runlocal=False)


def test_finetune_config_needs_init_from(tmp_path):
  sys.path.insert(0, str(REPO / "configs"))
  import tiny_stride8_ft  # noqa: PLC0415

  with pytest.raises(ValueError, match="--config.init_from"):
    trainer.Experiment.create(tiny_stride8_ft.get_config("runlocal"))


def test_non_finite_loss_stops_with_step_and_values():
  with pytest.raises(trainer.NonFiniteLossError, match="step 7.*'loss': nan"):
    trainer._check_finite([(6, {"loss": 1.0}), (7, {"loss": math.nan, "lr": 1e-3})])


# ------------------------------------------------------------------------------------------------
# End to end, through the command line: train, kill, resume, evaluate.
# ------------------------------------------------------------------------------------------------

TRAIN_OVERRIDES = [
  "--config.model.depth=2",
  "--config.total_steps=6",
  "--config.log_every_steps=1",
  "--config.eval_every_steps=6",
  "--config.checkpoint_every_steps=3",
]


def _train_command(workdir: Path) -> list[str]:
  return [sys.executable, "-m", "vim_jax.train", f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={workdir}"]


def _losses(workdir: Path) -> dict[int, float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def _env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # one CPU device, like a laptop


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(_train_command(workdir) + TRAIN_OVERRIDES, check=True, env=_env(), cwd=REPO, timeout=600)
  return workdir


def test_train_writes_metrics_checkpoints_and_best(uninterrupted):
  records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  assert all({"train/lr", "train/images_per_sec", "epoch"} <= r.keys() for r in train)
  assert any("eval/top1" in r and "eval/ema_top1" in r for r in records)
  assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  assert (uninterrupted / "best" / "config.json").is_file() and (uninterrupted / "config.json").is_file()
  assert list((uninterrupted / "tensorboard").iterdir())


def test_killed_run_resumes_exactly(uninterrupted, tmp_path):
  """SIGKILL after the step-3 checkpoint, restart the same command: the same losses as without a kill."""
  command = _train_command(tmp_path) + TRAIN_OVERRIDES
  process = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "3").is_dir() and time.time() < deadline and process.poll() is None:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (tmp_path / "checkpoints" / "3").is_dir()
  subprocess.run(command, check=True, env=_env(), cwd=REPO, timeout=600)
  expected, resumed = _losses(uninterrupted), _losses(tmp_path)
  assert resumed[6] == pytest.approx(expected[6], rel=1e-6)
  assert resumed[4] == pytest.approx(expected[4], rel=1e-6)


def test_sigterm_saves_and_stops(tmp_path):
  """Preemption: SIGTERM makes the trainer save a checkpoint at the current step and exit cleanly."""
  command = (
    _train_command(tmp_path) + TRAIN_OVERRIDES + ["--config.checkpoint_every_steps=100", "--config.total_steps=50"]
  )
  process = subprocess.Popen(command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics_file = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics_file.is_file() and metrics_file.read_text().strip()) and time.time() < deadline:
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr.decode()[-2000:]
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) < 50, saved
  assert max(saved) == max(_losses(tmp_path))


def test_evaluate_our_checkpoint_and_official_pth(uninterrupted, tmp_path):
  import vim_jax  # noqa: PLC0415
  from vim_jax import evaluate  # noqa: PLC0415

  config = demo_config()
  ours = evaluate.evaluate_checkpoint(config, str(uninterrupted / "best"))
  best = json.loads((uninterrupted / "best" / "metrics.json").read_text())
  assert ours["top1"] == pytest.approx(best["top1"]) and 0 <= ours["top1"] <= 100
  vim_jax.save_official(vim_jax.load_model(uninterrupted / "best"), tmp_path / "model.pth")
  assert evaluate.evaluate_checkpoint(config, str(tmp_path / "model.pth")) == pytest.approx(ours)
  with pytest.raises(ValueError, match="does not fit the config's model: depth 2 \\(config: 3\\)"):
    evaluate.evaluate_checkpoint(demo_config(**{"model.depth": 3}), str(uninterrupted / "best"))


@pytest.mark.slow
def test_demo_reaches_stated_accuracy(tmp_path):
  """README: `make demo` reaches >= 90% top-1 on the 300 held-out digits (measured: 96%)."""
  sys.path.insert(0, str(REPO / "configs"))
  import demo  # noqa: PLC0415

  result = trainer.train_and_evaluate(demo.get_config(), str(tmp_path))
  assert result["top1"] >= 90.0 and result["ema_top1"] >= 90.0, result


@pytest.mark.parametrize("name", ["tiny", "small", "base", "tiny_stride8_ft", "small_stride8_ft", "demo"])
def test_configs_load_and_document_their_command(name):
  sys.path.insert(0, str(REPO / "configs"))
  module = __import__(name)
  assert f"--config=configs/{name}.py" in module.__doc__
  config = module.get_config()
  assert config.model_name.startswith("vim_") and config.batch_size > 0
  if name != "demo":
    local = module.get_config("runlocal")
    local.init_from_required = False
    exp = trainer.Experiment.create(local, devices=jax.devices()[:1])
    assert exp.model_cfg.depth == 2 and exp.total_steps == 10
