"""The training loop: mesh -> data -> state born sharded -> restore -> jitted steps -> eval -> checkpoints.

The train state is a plain pytree (params, optimizer state, EMA, step, rng) so that `jax.jit` with
shardings, donation and orbax all see the same structure. The model's structure (graphdef) is static.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vim_jax import checkpointing, metrics, optim, sharding
from vim_jax.data import mixup, pipeline
from vim_jax.models import registry
from vim_jax.models.vim import ModelConfig, VisionMamba

log = logging.getLogger(__name__)

State = dict[str, Any]


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def model_config(config: ml_collections.ConfigDict, num_classes: int) -> ModelConfig:
  """The ModelConfig of an experiment config: a named variant plus `config.model` overrides."""
  overrides = {"img_size": config.data.image_size, "num_classes": num_classes, **config.model}
  return registry.model_config(config.model_name, **overrides)


def _initial_params(config, model_cfg: ModelConfig):
  """Fresh params, or those of `config.init_from` (an official .pth or a vim_jax model directory)."""
  if not config.get("init_from"):
    return nnx.state(VisionMamba(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
  init_from = Path(config.init_from)
  overrides = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig)}
  for inferred in ("patch_size", "in_chans", "embed_dim", "depth", "d_state", "d_conv", "expand", "dt_rank"):
    overrides.pop(inferred)  # read from the checkpoint
  img_size, stride, num_classes = overrides.pop("img_size"), overrides.pop("stride"), overrides.pop("num_classes")
  if init_from.suffix == ".pth":
    from vim_jax import official

    model = official.load_official(
      init_from,
      img_size=img_size,
      stride=stride,
      num_classes=num_classes,
      pos_embed_quirk=config.get("init_pos_embed_quirk", False),
      head_seed=config.seed,
      **overrides,
    )
  else:
    model = checkpointing.load_model(init_from)
  check_architecture(model.cfg, model_cfg, f"`init_from` {init_from}")
  return nnx.state(model, nnx.Param)


ARCHITECTURE_FIELDS = ("img_size", "patch_size", "stride", "embed_dim", "depth", "d_state", "expand", "num_classes")


def check_architecture(loaded: ModelConfig, wanted: ModelConfig, what: str) -> None:
  """Raises if a loaded model's parameters cannot stand in for the config's model."""
  diff = {
    f: (getattr(loaded, f), getattr(wanted, f)) for f in ARCHITECTURE_FIELDS if getattr(loaded, f) != getattr(wanted, f)
  }
  if diff:
    details = ", ".join(f"{f} {a} (config: {b})" for f, (a, b) in diff.items())
    raise ValueError(f"{what} does not fit the config's model: {details}")


def _replicated(mesh: jax.sharding.Mesh) -> bool:
  """Whether parameters are whole on every device, so that optimizer math may run on one concatenated vector
  (`optim.adamw` says why that is faster, and why FSDP-sharded parameters must not be concatenated)."""
  return mesh.shape["fsdp"] == 1


@dataclasses.dataclass
class Experiment:
  """Everything static about a run: configs, model structure, optimizer, shardings, jitted functions."""

  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: Any
  state_sharding: Any
  steps_per_epoch: int
  total_steps: int
  num_params: int
  mix: mixup.MixupConfig

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, devices=None) -> Experiment:
    """`devices`: those of the mesh (default: all devices of all processes)."""
    if config.get("init_from_required") and not config.get("init_from"):
      raise ValueError("this config fine-tunes a checkpoint: pass --config.init_from=PATH (.pth or model dir)")
    info = pipeline.dataset_info(config)
    model_cfg = model_config(config, info.num_classes)
    mesh = sharding.make_mesh(config.mesh.fsdp, devices)
    for name in ("batch_size", "eval_batch_size"):
      if config[name] % mesh.size:
        raise ValueError(f"`{name}` ({config[name]}) must be a multiple of the number of devices ({mesh.size})")
    steps_per_epoch = pipeline.steps_per_epoch(config)
    total_steps = config.total_steps or int(config.num_epochs * steps_per_epoch)
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: VisionMamba(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    peak_lr = optim.scaled_lr(config.optim.lr, config.batch_size, config.optim.unscale_lr)
    schedule = optim.lr_schedule(
      peak_lr=peak_lr,
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      warmup_epochs=config.optim.warmup_epochs,
      warmup_lr=config.optim.warmup_lr,
      min_lr=config.optim.min_lr,
      per_epoch=config.optim.per_epoch_schedule,
    )
    tx = optim.make_optimizer(config.optim, schedule=schedule, params=abstract_params, flatten=_replicated(mesh))
    abstract_state = jax.eval_shape(lambda p: cls._state_from_params(config, tx, p), abstract_params)
    mix = mixup.MixupConfig(num_classes=model_cfg.num_classes, **config.mixup)
    return cls(
      config=config,
      model_cfg=model_cfg,
      mesh=mesh,
      graphdef=graphdef,
      tx=tx,
      schedule=schedule,
      state_sharding=sharding.state_shardings(mesh, abstract_state),
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params)),
      mix=mix,
    )

  @staticmethod
  def _state_from_params(config, tx, params) -> State:
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema": params if config.ema_decay > 0 else None,
      "rng": jax.random.PRNGKey(config.seed),
    }

  def init_state(self) -> State:
    """The initial train state, created directly with its shardings (nothing lands on one device)."""
    if self.config.get("init_from"):
      params = jax.device_put(_initial_params(self.config, self.model_cfg), self.state_sharding["params"])
      return jax.jit(lambda p: self._state_from_params(self.config, self.tx, p), out_shardings=self.state_sharding)(
        params
      )
    init = lambda: self._state_from_params(self.config, self.tx, _initial_params(self.config, self.model_cfg))
    return jax.jit(init, out_shardings=self.state_sharding)()

  def model(self, params) -> VisionMamba:
    return nnx.merge(self.graphdef, params)

  # ---------------------------------------------------------------------------------------------
  def train_step(self, state: State, batch: dict) -> tuple[State, dict]:
    """One AdamW step on mixed, label-smoothed targets; EMA update; per-step rng by fold_in."""
    rng = jax.random.fold_in(state["rng"], state["step"])
    mix_rng, drop_rng = jax.random.split(rng)
    images, targets = mixup.mix_batch(mix_rng, batch["image"], batch["label"], self.mix)

    def loss_fn(params):
      logits = self.model(params)(images, rngs=nnx.Rngs(dropout=drop_rng))
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = state["ema"]
    if ema is not None:
      d = self.config.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
    grad_norm = optim.global_norm(grads, flatten=_replicated(self.mesh))
    return new_state, {"loss": loss, "lr": self.schedule(state["step"]), "grad_norm": grad_norm}

  def eval_step(self, params, batch: dict) -> dict:
    """Sums over the valid (mask = 1) examples: loss, top-1 and top-5 hits, count."""
    logits = self.model(params)(batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = top5[:, 0] == batch["label"]
    hit5 = jnp.any(top5 == batch["label"][:, None], axis=-1)
    return {
      "loss": jnp.sum(loss * mask),
      "top1": jnp.sum(hit1 * mask),
      "top5": jnp.sum(hit5 * mask),
      "count": jnp.sum(mask),
    }

  def jitted(self):
    """The train and eval steps, jitted with shardings; the train state is donated."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    replicated = sharding.replicated(self.mesh)
    train = jax.jit(
      self.train_step,
      in_shardings=(self.state_sharding, batch_sharding),
      out_shardings=(self.state_sharding, replicated),
      donate_argnums=0,
    )
    evaluate = jax.jit(self.eval_step, in_shardings=(self.state_sharding["params"], batch_sharding))
    return train, evaluate


def evaluate(exp: Experiment, eval_step, params, config) -> dict[str, float]:
  """Top-1/top-5 (in %) and mean loss over the eval split."""
  totals = None
  for local in pipeline.make_eval_iterator(config):
    sums = eval_step(params, sharding.global_batch(local, exp.mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {
    "loss": float(totals["loss"]) / count,
    "top1": 100 * float(totals["top1"]) / count,
    "top5": 100 * float(totals["top5"]) / count,
  }


def _check_finite(history: list[tuple[int, dict]]) -> None:
  for step, values in history:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
      raise NonFiniteLossError(f"non-finite values at step {step}: {bad} (all: {values})")


class _PreemptionFlag:
  """Set by SIGTERM; the loop then saves a checkpoint and stops cleanly."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving a checkpoint and stopping")
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training in `workdir`; returns the final evaluation metrics."""
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  exp = Experiment.create(config)
  with jax.set_mesh(exp.mesh):
    return _train_loop(exp, config, workdir)


def _train_loop(exp: Experiment, config: ml_collections.ConfigDict, workdir: Path) -> dict[str, float]:
  log.info(
    "devices: %d x %s (%d processes); mesh %s; global batch %d; %s, %s parameters; scan impl %s; %d steps "
    "(%d per epoch)",
    jax.device_count(),
    jax.devices()[0].device_kind,
    jax.process_count(),
    dict(exp.mesh.shape),
    config.batch_size,
    config.model_name,
    f"{exp.num_params:,}",
    exp.model_cfg.scan_impl or f"auto ({jax.default_backend()})",
    exp.total_steps,
    exp.steps_per_epoch,
  )
  train_iter = pipeline.make_train_iterator(config)
  ckpt = checkpointing.TrainCheckpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
  state = exp.init_state()
  state, start_step = ckpt.restore_latest(state, train_iter)
  if start_step:
    log.info("resumed from step %d", start_step)
  train_step, eval_step = exp.jitted()
  writer = metrics.MetricWriter(workdir)
  progress = metrics.Progress(total_steps=exp.total_steps, start_step=start_step, global_batch=config.batch_size)
  preempted = _PreemptionFlag()
  history: list[tuple[int, Any]] = []
  best_top1 = ckpt.best_metric()
  eval_every = config.eval_every_steps or exp.steps_per_epoch
  result: dict[str, float] = {}
  step = start_step
  try:
    while step < exp.total_steps and not preempted.raised:
      state, step_metrics = train_step(state, sharding.global_batch(next(train_iter), exp.mesh))
      step += 1
      history.append((step, step_metrics))
      if step % config.log_every_steps == 0 or step == exp.total_steps:
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in history]
        history.clear()
        _check_finite(fetched)
        scalars = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        scalars["lr"] = fetched[-1][1]["lr"]
        scalars["images_per_sec"] = progress.update(step, scalars)
        scalars["epoch"] = step / exp.steps_per_epoch
        writer.write(step, {f"train/{k}" if k != "epoch" else k: v for k, v in scalars.items()})
      if step % eval_every == 0 or step == exp.total_steps:
        result = evaluate(exp, eval_step, state["params"], config)
        if state["ema"] is not None:
          result |= {f"ema_{k}": v for k, v in evaluate(exp, eval_step, state["ema"], config).items()}
        writer.write(step, {f"eval/{k}": v for k, v in result.items()})
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        if best_top1 is None or result["top1"] > best_top1:
          best_top1 = result["top1"]
          ckpt.save_best(exp.model(state["params"]), step, result)
      if step % config.checkpoint_every_steps == 0 or step == exp.total_steps:
        ckpt.save(step, state, train_iter)
    if preempted.raised and ckpt.latest_step() != step:
      ckpt.save(step, state, train_iter)
  finally:
    preempted.restore()
    ckpt.close()
    progress.close()
    writer.close()
  if not result and step >= exp.total_steps:  # restarted after the run had finished
    result = evaluate(exp, eval_step, state["params"], config)
  if jax.process_index() == 0 and result:
    log.info("final: %s", json.dumps(result))
  return result
