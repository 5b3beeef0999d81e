"""vim_jax.data.augment: timm 0.4.12's train transform and Vim's eval transform, op by op, against PIL directly."""

import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vim_jax.data import augment as A

MEAN = np.asarray(A.IMAGENET_MEAN, np.float32)
STD = np.asarray(A.IMAGENET_STD, np.float32)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth, asymmetric uint8 test image (gradients plus a bright off-centre block)."""
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 60 * np.sin(x / 7 + y / 11)], axis=-1)
  img[h // 5 : h // 3, w // 6 : w // 2] = (250, 30, 200)
  img += np.random.default_rng(seed).normal(0, 4, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def _pil(h: int = 48, w: int = 64) -> Image.Image:
  return Image.fromarray(_image(h, w))


# ------------------------------------------------------------------------------------------------
# Full transforms


@pytest.mark.parametrize(
  "shape,size",
  [((375, 500, 3), 224), ((20, 30, 3), 32), ((300, 80, 3), 64), ((64, 80), 48), ((64, 80, 1), 48)],
)
def test_train_and_eval_shapes(shape, size):
  img = _image(*shape[:2])
  if len(shape) == 2:
    img = img[..., 0]
  elif shape[2] == 1:
    img = img[..., :1]
  for seed in range(3):
    x = A.train_transform(img, np.random.default_rng(seed), image_size=size)
    assert x.shape == (size, size, 3) and x.dtype == np.float32 and np.isfinite(x).all()
  y = A.eval_transform(img, image_size=size)
  assert y.shape == (size, size, 3) and y.dtype == np.float32
  if len(shape) == 2 or shape[2] == 1:  # grayscale is replicated: the three channels agree before normalisation
    raw = y * STD + MEAN
    np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-6)
    np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-6)


def test_train_transform_is_a_function_of_the_generator_only():
  img = _image(375, 500)
  random.seed(0)
  np.random.seed(0)
  a = A.train_transform(img, np.random.default_rng(7), image_size=96, re_prob=1.0)
  random.seed(1)  # the global generators must not matter
  np.random.seed(1)
  b = A.train_transform(img, np.random.default_rng(7), image_size=96, re_prob=1.0)
  np.testing.assert_array_equal(a, b)
  c = A.train_transform(img, np.random.default_rng(8), image_size=96, re_prob=1.0)
  assert not np.array_equal(a, c)


def test_train_transform_order_crop_flip_normalize():
  """With crop = whole image and RandAugment/erasing off, the output is the normalized resized (flipped) image."""
  img = _image(120, 120)
  kw = dict(image_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment=None, re_prob=0.0)
  resized = Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC)
  flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  expected = (np.asarray(flipped, np.float32) / 255 - MEAN) / STD
  np.testing.assert_array_equal(A.train_transform(img, np.random.default_rng(0), hflip=1.0, **kw), expected)
  not_flipped = A.train_transform(img, np.random.default_rng(0), hflip=0.0, **kw)
  np.testing.assert_array_equal(not_flipped, A.normalize(resized))
  flips = [not np.array_equal(A.train_transform(img, np.random.default_rng(s), **kw), not_flipped) for s in range(200)]
  assert 0.4 < np.mean(flips) < 0.6


def test_normalize_matches_float64_reference():
  img = _image(10, 12)
  ref = (img.astype(np.float64) / 255 - np.asarray(A.IMAGENET_MEAN)) / np.asarray(A.IMAGENET_STD)
  x = A.normalize(img)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x, ref, atol=1e-6)


def test_eval_transform_resize_and_center_crop():
  img = _image(300, 400)  # H=300, W=400: shorter side 300 -> 256, longer int(256 * 400 / 300) = 341
  resized = Image.fromarray(img).resize((341, 256), Image.Resampling.BICUBIC)
  left, top = round((341 - 224) / 2), (256 - 224) // 2  # round(58.5) = 58, as torchvision's int(round(...))
  expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float64)
  got = A.eval_transform(img, image_size=224)
  np.testing.assert_allclose(got, (expected / 255 - A.IMAGENET_MEAN) / A.IMAGENET_STD, atol=1e-5)
  portrait = img.transpose(1, 0, 2).copy()  # W=300, H=400: shorter side is now the width
  resized = Image.fromarray(portrait).resize((256, 341), Image.Resampling.BICUBIC)
  expected = np.asarray(resized.crop((top, left, top + 224, left + 224)), np.float64)
  got = A.eval_transform(portrait, image_size=224)
  np.testing.assert_allclose(got, (expected / 255 - A.IMAGENET_MEAN) / A.IMAGENET_STD, atol=1e-5)
  mean_img = np.broadcast_to(np.asarray(A.imagenet_fill(), np.uint8), (256, 256, 3))
  assert np.abs(A.eval_transform(mean_img, image_size=224)).max() < 0.01  # the mean colour normalizes to ~0


def test_bad_inputs():
  with pytest.raises(ValueError, match="uint8"):
    A.train_transform(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), image_size=8)
  with pytest.raises(ValueError, match="shape"):
    A.eval_transform(np.zeros((8, 8, 4), np.uint8), image_size=8)
  with pytest.raises(ValueError, match="randaugment"):
    A.train_transform(_image(8, 8), np.random.default_rng(0), image_size=8, randaugment="augmix-m5")


# ------------------------------------------------------------------------------------------------
# RandomResizedCrop


def test_random_resized_crop_statistics():
  rng = np.random.default_rng(0)
  boxes = np.array([A.random_resized_crop_params(400, 300, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
  area = h * w / (400 * 300)
  aspect = w / h
  assert area.min() > 0.075 and area.max() <= 1.0  # U(0.08, 1) up to rounding of w and h
  assert aspect.min() > 0.74 and aspect.max() < 1.35
  square = np.array([A.random_resized_crop_params(300, 300, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
  assert abs(np.mean(np.log(square[:, 3] / square[:, 2]))) < 0.01  # log-uniform aspect, symmetric around 1
  assert area.max() > 0.9 and np.mean(area < 0.2) > 0.08  # the whole range is used


@pytest.mark.parametrize(
  "ratio,expected",
  [((10.0, 20.0), (45, 0, 10, 100)), ((0.05, 0.1), (0, 45, 100, 10)), ((0.5, 2.0), (0, 0, 100, 100))],
)
def test_random_resized_crop_fallback(ratio, expected):
  """No try fits when the sampled box exceeds the image: timm falls back to a centred crop with clamped aspect."""
  rng = np.random.default_rng(0)
  assert A.random_resized_crop_params(100, 100, rng, (1.5, 2.0), ratio) == expected


def test_random_resized_crop_is_crop_then_resize():
  img = _pil(90, 120)
  top, left, h, w = A.random_resized_crop_params(120, 90, np.random.default_rng(3), (0.08, 1.0), (3 / 4, 4 / 3))
  expected = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
  got = A.random_resized_crop(img, np.random.default_rng(3), 32)
  assert got.size == (32, 32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


# ------------------------------------------------------------------------------------------------
# RandAugment ops


def _op(img, name, m, seed=0, **kw):
  return np.asarray(A.apply_op(img, name, m, np.random.default_rng(seed), **kw))


def _both_signs(img, name, m, **kw):
  """The op's outputs over seeds (the argument's sign is the only random part): exactly two distinct results."""
  outs = {_op(img, name, m, seed, **kw).tobytes() for seed in range(16)}
  assert len(outs) == 2
  return outs


def test_invert_and_solarize():
  img = _pil()
  x = np.asarray(img)
  np.testing.assert_array_equal(_op(img, "Invert", 3), 255 - x)
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", 10), 255 - x)  # threshold 0: everything inverted
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", 0), x)  # threshold 256: nothing
  np.testing.assert_array_equal(_op(img, "Solarize", 5), np.where(x < 128, x, 255 - x))  # threshold 128
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", 5), np.where(x < 128, x, 255 - x))
  np.testing.assert_array_equal(_op(img, "SolarizeAdd", 10), np.where(x < 128, np.minimum(x + 110, 255), x))
  np.testing.assert_array_equal(_op(img, "SolarizeAdd", 0), x)


@pytest.mark.parametrize(
  "name,m,bits", [("PosterizeIncreasing", 0, 4), ("PosterizeIncreasing", 5, 2), ("PosterizeIncreasing", 9, 1),
                  ("PosterizeIncreasing", 10, 0), ("Posterize", 10, 4), ("Posterize", 5, 2), ("Posterize", 0, 0)]
)  # fmt: skip
def test_posterize_bits(name, m, bits):
  img = _pil()
  mask = (0xFF << (8 - bits)) & 0xFF
  np.testing.assert_array_equal(_op(img, name, m), np.asarray(img) & mask)


def test_autocontrast_equalize_match_imageops():
  img = _pil()
  np.testing.assert_array_equal(_op(img, "AutoContrast", 9), np.asarray(ImageOps.autocontrast(img)))
  np.testing.assert_array_equal(_op(img, "Equalize", 9), np.asarray(ImageOps.equalize(img)))


@pytest.mark.parametrize("kind", ["Color", "Contrast", "Brightness", "Sharpness"])
def test_enhance_ops(kind):
  img = _pil()
  x = np.asarray(img)
  np.testing.assert_array_equal(_op(img, f"{kind}Increasing", 0), x)  # factor 1.0
  np.testing.assert_array_equal(_op(img, kind, 5), x)  # plain ops: factor m / 10 * 1.8 + 0.1 = 1.0 at m = 5
  enhancer = getattr(ImageEnhance, kind)(img)
  expected = {np.asarray(enhancer.enhance(f)).tobytes() for f in (1.0 + 7 / 10 * 0.9, 1.0 - 7 / 10 * 0.9)}
  assert _both_signs(img, f"{kind}Increasing", 7) == expected
  np.testing.assert_array_equal(_op(img, kind, 10), np.asarray(enhancer.enhance(10 / 10 * 1.8 + 0.1)))


def test_rotate_matches_pil():
  img = _pil()
  fill = A.imagenet_fill()
  assert fill == (124, 116, 104)
  expected = {
    np.asarray(img.rotate(deg, resample=Image.Resampling.BICUBIC, fillcolor=fill)).tobytes()
    for deg in (7 / 10 * 30, -7 / 10 * 30)
  }
  assert _both_signs(img, "Rotate", 7) == expected  # 30 * 7 / 10 degrees
  np.testing.assert_array_equal(_op(img, "Rotate", 0), np.asarray(img))


@pytest.mark.parametrize("name,matrix", [("ShearX", (1, "f", 0, 0, 1, 0)), ("ShearY", (1, 0, 0, "f", 1, 0))])
def test_shear_matches_pil(name, matrix):
  img = _pil()
  expected = set()
  for f in (0.3, -0.3):
    data = tuple(f if v == "f" else v for v in matrix)
    out = img.transform(img.size, Image.Transform.AFFINE, data, Image.Resampling.BICUBIC, fillcolor=(1, 2, 3))
    expected.add(np.asarray(out).tobytes())
  assert _both_signs(img, name, 10, fill=(1, 2, 3)) == expected


def test_translate_moves_a_marker():
  x = np.zeros((40, 60, 3), np.uint8)
  x[10, 30] = 255
  img = Image.fromarray(x)

  def marker(out):
    return {tuple(p) for p in np.argwhere(out[..., 0] == 255)}

  # absolute: translate_const * m / 10 = 10 pixels either way
  got = {frozenset(marker(_op(img, "TranslateX", 1, s, translate_const=100, fill=(0, 0, 0)))) for s in range(16)}
  assert got == {frozenset({(10, 20)}), frozenset({(10, 40)})}
  got = {frozenset(marker(_op(img, "TranslateY", 1, s, translate_const=50, fill=(0, 0, 0)))) for s in range(16)}
  assert got == {frozenset({(5, 30)}), frozenset({(15, 30)})}
  # relative: 0.45 * m / 10 of the width / height; m = 10 / 3 -> 0.15 * 60 = 9 px, 0.15 * 40 = 6 px
  got = {frozenset(marker(_op(img, "TranslateXRel", 10 / 3, s, fill=(0, 0, 0)))) for s in range(16)}
  assert got == {frozenset({(10, 21)}), frozenset({(10, 39)})}
  got = {frozenset(marker(_op(img, "TranslateYRel", 10 / 3, s, fill=(0, 0, 0)))) for s in range(16)}
  assert got == {frozenset({(4, 30)}), frozenset({(16, 30)})}
  # the default translate_const is int(0.45 * shorter side) = 18; the vacated strip gets the ImageNet mean colour
  out = _op(img, "TranslateX", 10, 0)
  moved = marker(out)
  assert moved in ({(10, 12)}, {(10, 48)})
  vacated = out[:, -18:] if moved == {(10, 12)} else out[:, :18]
  assert (vacated == (124, 116, 104)).all()


def test_every_op_keeps_size_and_mode_and_magnitude_is_clipped():
  img = _pil()
  for name in A.OP_NAMES:
    out = A.apply_op(img, name, 9.3, np.random.default_rng(0))
    assert out.size == img.size and out.mode == "RGB", name
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", 25), _op(img, "SolarizeIncreasing", 10))
  np.testing.assert_array_equal(_op(img, "SolarizeIncreasing", -3), np.asarray(img))
  with pytest.raises(ValueError, match="Cutout"):
    A.apply_op(img, "Cutout", 5, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------
# RandAugment spec and policy


def test_parse_rand_augment():
  cfg = A.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing, cfg.weights) == (9, 2, 0.5, True, None)
  assert cfg.ops[4:6] == ("PosterizeIncreasing", "SolarizeIncreasing") and len(cfg.ops) == 15
  cfg = A.parse_rand_augment("rand-n3-m7")
  assert (cfg.magnitude, cfg.num_layers, cfg.magnitude_std, cfg.increasing) == (7, 3, 0.0, False)
  assert cfg.ops[4:6] == ("Posterize", "Solarize")
  assert A.parse_rand_augment("rand").magnitude == 10  # timm's defaults
  assert not A.parse_rand_augment("rand-m9-inc0").increasing
  weights = A.parse_rand_augment("rand-w0").weights
  assert weights is not None and abs(sum(weights) - 1) < 1e-9 and weights[3] == pytest.approx(0.3)  # Rotate


@pytest.mark.parametrize("spec", ["auto-m9", "rand-m9-foo1", "rand-mx", "rand-m9-w1", "rand-m9-inc", "rand-m9.5", ""])
def test_parse_rand_augment_rejects_bad_specs(spec):
  with pytest.raises(ValueError, match="randaugment"):
    A.parse_rand_augment(spec)


def test_rand_augment_policy(monkeypatch):
  img = _pil(32, 32)
  np.testing.assert_array_equal(np.asarray(A.rand_augment(img, np.random.default_rng(0), "rand-n0")), np.asarray(img))
  a = A.rand_augment(img, np.random.default_rng(5), "rand-m9-mstd0.5-inc1")
  b = A.rand_augment(img, np.random.default_rng(5), "rand-m9-mstd0.5-inc1")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  calls = []
  monkeypatch.setattr(A, "apply_op", lambda img, name, m, rng, **kw: calls.append((name, m, kw)) or img)

  def run(spec, n):
    per_image = []
    for s in range(n):
      calls.clear()
      A.rand_augment(img, np.random.default_rng(s), spec, fill=(1, 2, 3), translate_const=7)
      per_image.append(list(calls))
    return per_image

  per_image = run("rand-m9-mstd0.5-inc1", 3000)
  counts = np.array([len(c) for c in per_image])
  assert counts.max() == 2 and abs(counts.mean() - 1) < 0.05 and abs(np.mean(counts == 0) - 0.25) < 0.03  # 2 x p 0.5
  names = [name for c in per_image for name, _, _ in c]
  assert set(names) == set(A.parse_rand_augment("rand-inc1").ops)
  assert max(names.count(n) for n in set(names)) / len(names) < 1.4 / 15  # uniform choice
  m = np.array([m for c in per_image for _, m, _ in c])
  assert abs(m.mean() - 9) < 0.05 and abs(m.std() - 0.5) < 0.05 and m.max() > 10  # clipped later, in apply_op
  assert all(kw == dict(fill=(1, 2, 3), translate_const=7, resample=A.BICUBIC) for c in per_image for *_, kw in c)
  assert {m for c in run("rand-m7", 50) for _, m, _ in c} == {7}  # no mstd: fixed magnitude
  for c in run("rand-m10-n13-w0", 200):  # weighted: without replacement, never a zero-weight op
    names = [name for name, _, _ in c]
    assert len(set(names)) == len(names) and not {"Invert", "Posterize"} & set(names)


# ------------------------------------------------------------------------------------------------
# RandomErasing


def _box(changed: np.ndarray) -> tuple[int, int, int, int]:
  rows, cols = np.nonzero(changed)
  top, left = rows.min(), cols.min()
  h, w = rows.max() - top + 1, cols.max() - left + 1
  assert changed[top : top + h, left : left + w].all() and changed.sum() == h * w  # one solid rectangle
  return top, left, h, w


def test_random_erasing_pixel():
  x = np.full((64, 48, 3), 5.0, np.float32)
  erased, areas, aspects = 0, [], []
  for s in range(2000):
    out = A.random_erasing(x, np.random.default_rng(s), 0.25)
    assert out.dtype == np.float32 and out.shape == x.shape
    changed = (out != 5.0).any(-1)
    if changed.any():
      erased += 1
      _, _, h, w = _box(changed)
      areas.append(h * w / (64 * 48))
      aspects.append(h / w)
      noise = out[changed]
      assert abs(noise.mean()) < 1.0 and np.all(noise != 5.0)
  assert (x == 5.0).all()  # the input is never modified
  assert 0.22 < erased / 2000 < 0.28
  assert min(areas) > 0.015 and max(areas) < 0.36  # U(0.02, 1/3) up to rounding
  assert min(aspects) > 0.25 and max(aspects) < 1 / 0.25  # log-uniform in (0.3, 1/0.3) up to rounding
  big = A.random_erasing(np.zeros((224, 224, 3), np.float32), np.random.default_rng(1), 1.0)
  vals = big[(big != 0).any(-1)]
  assert vals.size > 0.02 * 224 * 224 * 3 * 0.9 and abs(vals.std() - 1) < 0.05 and abs(vals.mean()) < 0.05


def test_random_erasing_modes():
  x = np.full((32, 32, 3), 5.0, np.float32)
  out = A.random_erasing(x, np.random.default_rng(0), 1.0, mode="const")
  assert (out[(out != 5.0).any(-1)] == 0).all()
  out = A.random_erasing(x, np.random.default_rng(0), 1.0, mode="rand")
  vals = out[(out != 5.0).any(-1)]
  assert len(vals) > 0 and (vals == vals[0]).all()  # one random colour per box
  assert A.random_erasing(x, np.random.default_rng(0), 0.0) is x
  with pytest.raises(ValueError, match="mode"):
    A.random_erasing(x, np.random.default_rng(0), 1.0, mode="noise")
