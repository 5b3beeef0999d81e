"""Official checkpoints in and out: load_official, the convert CLI, round trips, pos-embed resize."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy_vim
import pytest
from conftest import DATA, VIM_REF
from fast_compile import logits_of
from flax import nnx

import vim_jax
from vim_jax import convert as convert_cli
from vim_jax import pth
from vim_jax.models import convert, layers
from vim_jax.models.vim import ModelConfig, VisionMamba

CHECKPOINT = VIM_REF / "checkpoint.pth"
CHECKPOINT_FULL = VIM_REF / "checkpoint_full.pth"


def rel_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def assert_same_weights(model: VisionMamba, state_dict: dict) -> None:
  ours = convert.to_official_state_dict(model)
  assert sorted(ours) == sorted(state_dict)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.parametrize("path", [CHECKPOINT, CHECKPOINT_FULL], ids=["model_only", "full_training_dict"])
def test_load_official_gives_official_logits(vim_ref, path):
  model = vim_jax.load_official(path, img_size=64)
  assert model.cfg.stride == 16 and model.cfg.depth == 4 and model.cfg.num_classes == 10
  assert rel_error(logits_of(model, vim_ref["images"]), vim_ref["logits64"]) <= 1e-5


def test_load_official_ema(vim_ref):
  """The EMA weights load exactly, and give the float64 logits of those weights."""
  ema_state_dict = dict(np.load(VIM_REF / "checkpoint_full_ema_params.npz"))
  model = vim_jax.load_official(CHECKPOINT_FULL, img_size=64, use_ema=True)
  assert_same_weights(model, ema_state_dict)
  expected = numpy_vim.forward(ema_state_dict, vim_ref["images_nchw"])
  assert rel_error(logits_of(model, vim_ref["images"]), expected) <= 1e-5
  assert rel_error(expected, vim_ref["logits64"]) > 1e-3  # EMA really differs from `model`


def test_use_ema_needs_a_training_checkpoint():
  with pytest.raises(ValueError, match="no 'model_ema' entry"):
    vim_jax.load_official(CHECKPOINT, img_size=64, use_ema=True)


def test_official_state_dict_round_trip_is_exact(vim_ref, tmp_path):
  model = vim_jax.load_official(CHECKPOINT, img_size=64)
  assert_same_weights(model, vim_ref["state_dict"])
  vim_jax.save_official(model, tmp_path / "out.pth")
  written = pth.read_pth(tmp_path / "out.pth")
  assert list(written) == ["model"]
  for name, value in vim_ref["state_dict"].items():
    np.testing.assert_array_equal(written["model"][name], value, err_msg=name)


def test_convert_cli_both_directions(vim_ref, tmp_path, capsys):
  assert convert_cli.main([str(CHECKPOINT_FULL), str(tmp_path / "vim"), "--img-size", "64"]) == 0
  assert "depth 4" in capsys.readouterr().out
  model = vim_jax.load_model(tmp_path / "vim")
  assert model.cfg.img_size == (64, 64)
  assert_same_weights(model, vim_ref["state_dict"])
  assert rel_error(logits_of(model, vim_ref["images"]), vim_ref["logits64"]) <= 1e-5
  assert convert_cli.main(["--to-pytorch", str(tmp_path / "vim"), str(tmp_path / "back.pth")]) == 0
  back = pth.read_pth(tmp_path / "back.pth")["model"]
  for name, value in vim_ref["state_dict"].items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_load_model_overrides_numerics(tmp_path):
  model = VisionMamba(ModelConfig(img_size=32, embed_dim=16, depth=1, num_classes=3), rngs=nnx.Rngs(0))
  vim_jax.save_model(model, tmp_path / "m")
  assert vim_jax.load_model(tmp_path / "m", dtype="bfloat16").cfg.dtype == "bfloat16"
  with pytest.raises(FileNotFoundError, match="config.json"):
    vim_jax.load_model(tmp_path)


class TestArchitectureInference:
  def test_stride8_and_head_replacement(self, tmp_path):
    cfg = ModelConfig(img_size=48, stride=8, embed_dim=32, depth=2, num_classes=7)
    vim_jax.save_official(VisionMamba(cfg, rngs=nnx.Rngs(0)), tmp_path / "s8.pth")
    loaded = vim_jax.load_official(tmp_path / "s8.pth", img_size=48)
    assert (loaded.cfg.stride, loaded.cfg.seq_len, loaded.cfg.cls_index) == (8, 26, 12)
    assert loaded.cfg == dataclasses.replace(cfg, dt_rank=cfg.resolved_dt_rank)
    new_head = vim_jax.load_official(tmp_path / "s8.pth", img_size=48, num_classes=3)
    assert new_head.head.kernel.shape == (32, 3)
    np.testing.assert_array_equal(new_head.pos_embed[...], loaded.pos_embed[...])
    assert vim_jax.load_official(tmp_path / "s8.pth", img_size=48, num_classes=0).head is None

  def test_stride_cannot_be_inferred(self):
    with pytest.raises(ValueError, match="cannot infer the patch stride.*pass stride="):
      vim_jax.load_official(CHECKPOINT, img_size=224)

  def test_other_resolution_resizes_pos_embed(self, vim_ref):
    model = vim_jax.load_official(CHECKPOINT, img_size=96, stride=16)
    assert model.cfg.grid_size == (6, 6) and model.pos_embed.shape == (1, 37, 64)
    cls_old, cls_new = 8, 18
    np.testing.assert_array_equal(model.pos_embed[0, cls_new], vim_ref["state_dict"]["pos_embed"][0, cls_old])
    assert logits_of(model, np.ones((1, 96, 96, 3), np.float32)).shape == (1, 10)

  def test_bad_state_dict_reports_every_problem(self, vim_ref):
    state_dict = dict(vim_ref["state_dict"])
    del state_dict["layers.1.mixer.D_b"]
    state_dict["layers.2.mixer.x_proj.weight"] = np.zeros((3, 3), np.float32)
    state_dict["layers.0.mixer.rope"] = np.zeros(3, np.float32)
    cfg, _ = convert.infer_config(vim_ref["state_dict"], img_size=64)
    with pytest.raises(ValueError) as info:
      convert.from_official_state_dict(state_dict, cfg)
    message = str(info.value)
    assert "missing key 'layers.1.mixer.D_b'" in message
    assert "'layers.2.mixer.x_proj.weight' has shape (3, 3), expected (36, 128)" in message
    assert "unexpected key 'layers.0.mixer.rope'" in message

  def test_foreign_state_dict(self):
    with pytest.raises(ValueError, match="not a Vim state_dict"):
      convert.infer_config({"fc.weight": np.zeros((2, 2))})


@pytest.fixture(scope="module")
def torch_bicubic():
  """torch F.interpolate(mode='bicubic', align_corners=False) outputs; see tests/data/pos_embed."""
  return dict(np.load(DATA / "pos_embed" / "bicubic.npz"))


class TestPosEmbedResize:
  @pytest.mark.parametrize("case", ["4x4_7x7", "14x14_27x27", "5x3_2x4", "6x6_6x6"])
  def test_bicubic_equals_torch(self, torch_bicubic, case):
    grid, expected = torch_bicubic[f"in_{case}"], torch_bicubic[f"out_{case}"]
    np.testing.assert_allclose(layers.resize_grid(grid, expected.shape[:2]), expected, rtol=0, atol=1e-12)

  def test_keeps_cls_slot_in_the_middle(self):
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 17, 4))
    new = layers.resize_pos_embed(pos, (4, 4), (3, 3))
    assert new.shape == (1, 10, 4)
    np.testing.assert_array_equal(new[0, 4], pos[0, 8])
    same = layers.resize_pos_embed(pos, (4, 4), (4, 4))
    np.testing.assert_allclose(same, pos, atol=1e-12)

  def test_official_quirk(self, torch_bicubic):
    """new[0] = old[0]; new[1:] = bicubic of old[1:] as a square grid (cls slot not respected)."""
    grid, expected = torch_bicubic["in_14x14_27x27"], torch_bicubic["out_14x14_27x27"]
    first = np.arange(8.0)[None]
    pos = np.concatenate([first, grid.reshape(196, 8)])[None]
    new = layers.resize_pos_embed(pos, (14, 14), (27, 27), official_quirk=True)
    np.testing.assert_array_equal(new[0, 0], first[0])
    np.testing.assert_allclose(new[0, 1:], expected.reshape(729, 8), atol=1e-12)

  def test_wrong_shape(self):
    with pytest.raises(ValueError, match=r"`pos_embed` must have shape \(1, 17, dim\)"):
      layers.resize_pos_embed(np.zeros((1, 16, 4)), (4, 4), (3, 3))
