"""Per-example image transforms in numpy + Pillow, as timm 0.4.12 builds them for the official Vim (vim_spec.md §5.2).

Train is timm `create_transform(is_training=True)`: RandomResizedCropAndInterpolation (bicubic) -> RandomHorizontalFlip
-> RandAugment -> ToTensor/Normalize -> RandomErasing. Eval is Vim's `build_transform(is_train=False)`: Resize(shorter
side, bicubic) -> CenterCrop -> ToTensor/Normalize. The training hosts have neither torch nor TF, so the PIL calls timm
makes are made here directly; the draws come from the caller's `np.random.Generator` instead of Python's and numpy's
global state, so a pipeline that seeds one generator per (seed, example index) is deterministic. Arrays stay HWC.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = Image.Resampling.BICUBIC

_MAX_LEVEL = 10.0  # RandAugment magnitudes live in [0, 10]; the op arguments scale with magnitude / 10.


def imagenet_fill(mean: Sequence[float] = IMAGENET_MEAN) -> tuple[int, ...]:
  """Fill colour of the geometric RandAugment ops: timm's `img_mean` hparam, the dataset mean in uint8."""
  return tuple(min(255, round(255 * m)) for m in mean)


def to_pil_rgb(image: np.ndarray) -> Image.Image:
  """uint8 HWC RGB, or HW / HW1 grayscale replicated to RGB (as the torch loaders' `convert('RGB')`) -> PIL image."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be HW, HW1 or HW3, got shape {image.shape}")
  return Image.fromarray(np.ascontiguousarray(image))


def normalize(
  image: np.ndarray | Image.Image, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
  """uint8 HWC -> float32 `(x / 255 - mean) / std`, in torchvision's ToTensor + Normalize float32 order."""
  x = np.asarray(image, dtype=np.float32) / np.float32(255)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# ------------------------------------------------------------------------------------------------
# RandomResizedCropAndInterpolation (timm/data/transforms.py)


def random_resized_crop_params(
  width: int, height: int, rng: np.random.Generator, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of timm's `get_params`: 10 tries of area ~ U(scale), log-uniform aspect, else a center crop."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if w <= width and h <= height:
      top = int(rng.integers(0, height - h + 1))  # random.randint is inclusive
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height  # fallback: the whole image, clamped to the ratio range, centred
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
  img: Image.Image,
  rng: np.random.Generator,
  size: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  interpolation: Image.Resampling = BICUBIC,
) -> Image.Image:
  """Crop then resize to (size, size), as torchvision `F.resized_crop` on PIL (the crop's edges clamp the filter)."""
  top, left, h, w = random_resized_crop_params(img.width, img.height, rng, scale, ratio)
  return img.crop((left, top, left + w, top + h)).resize((size, size), interpolation)


# ------------------------------------------------------------------------------------------------
# RandAugment (timm/data/auto_augment.py)

_RAND_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
_RAND_INCREASING_TRANSFORMS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
# timm's `_RAND_CHOICE_WEIGHTS_0` ('w0'). timm orders them as `_RAND_TRANSFORMS` and applies them by position to
# whichever op list is in use, so an increasing op gets its plain counterpart's weight.
_RAND_CHOICE_WEIGHTS_0 = {
  "Rotate": 0.3,
  "ShearX": 0.2,
  "ShearY": 0.2,
  "TranslateXRel": 0.1,
  "TranslateYRel": 0.1,
  "Color": 0.025,
  "Sharpness": 0.025,
  "AutoContrast": 0.025,
  "Solarize": 0.005,
  "SolarizeAdd": 0.005,
  "Contrast": 0.005,
  "Brightness": 0.005,
  "Equalize": 0.005,
  "Posterize": 0,
  "Invert": 0,
}


def _negate(v: float, rng: np.random.Generator) -> float:
  """timm `_randomly_negate`: the sign of a signed op argument is a coin flip."""
  return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, matrix: tuple[float, ...], fill, resample) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
  """Keep the top `bits` bits. Pillow's own posterize refuses 0 bits (black with the 2021 Pillow timm 0.4.12 ran on),
  which PosterizeIncreasing reaches at magnitude 10."""
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


_Level = Callable[[float, np.random.Generator, int], float]  # (magnitude, rng, translate_const) -> op argument
_Op = Callable[[Image.Image, float, tuple[int, ...], Image.Resampling], Image.Image]  # (img, arg, fill, resample)

_enhance: _Level = lambda m, rng, tc: m / _MAX_LEVEL * 1.8 + 0.1
_enhance_increasing: _Level = lambda m, rng, tc: 1.0 + _negate(m / _MAX_LEVEL * 0.9, rng)
_posterize_level: _Level = lambda m, rng, tc: int(m / _MAX_LEVEL * 4)
_solarize_level: _Level = lambda m, rng, tc: int(m / _MAX_LEVEL * 256)
_shear_level: _Level = lambda m, rng, tc: _negate(m / _MAX_LEVEL * 0.3, rng)
_translate_abs_level: _Level = lambda m, rng, tc: _negate(m / _MAX_LEVEL * float(tc), rng)
_translate_rel_level: _Level = lambda m, rng, tc: _negate(m / _MAX_LEVEL * 0.45, rng)

_color: _Op = lambda img, f, fill, rs: ImageEnhance.Color(img).enhance(f)
_contrast: _Op = lambda img, f, fill, rs: ImageEnhance.Contrast(img).enhance(f)
_brightness: _Op = lambda img, f, fill, rs: ImageEnhance.Brightness(img).enhance(f)
_sharpness: _Op = lambda img, f, fill, rs: ImageEnhance.Sharpness(img).enhance(f)

# name -> (magnitude -> argument, or None for ops without one; the PIL op), as timm's LEVEL_TO_ARG and NAME_TO_OP.
_OPS: dict[str, tuple[_Level | None, _Op]] = {
  "AutoContrast": (None, lambda img, _, fill, rs: ImageOps.autocontrast(img)),
  "Equalize": (None, lambda img, _, fill, rs: ImageOps.equalize(img)),
  "Invert": (None, lambda img, _, fill, rs: ImageOps.invert(img)),
  "Rotate": (
    lambda m, rng, tc: _negate(m / _MAX_LEVEL * 30.0, rng),
    lambda img, deg, fill, rs: img.rotate(deg, resample=rs, fillcolor=fill),
  ),
  "Posterize": (_posterize_level, lambda img, bits, fill, rs: _posterize(img, bits)),
  "PosterizeIncreasing": (
    lambda m, rng, tc: 4 - _posterize_level(m, rng, tc),
    lambda img, bits, fill, rs: _posterize(img, bits),
  ),
  "Solarize": (_solarize_level, lambda img, t, fill, rs: ImageOps.solarize(img, t)),
  "SolarizeIncreasing": (
    lambda m, rng, tc: 256 - _solarize_level(m, rng, tc),
    lambda img, t, fill, rs: ImageOps.solarize(img, t),
  ),
  "SolarizeAdd": (lambda m, rng, tc: int(m / _MAX_LEVEL * 110), lambda img, add, fill, rs: _solarize_add(img, add)),
  "Color": (_enhance, _color),
  "ColorIncreasing": (_enhance_increasing, _color),
  "Contrast": (_enhance, _contrast),
  "ContrastIncreasing": (_enhance_increasing, _contrast),
  "Brightness": (_enhance, _brightness),
  "BrightnessIncreasing": (_enhance_increasing, _brightness),
  "Sharpness": (_enhance, _sharpness),
  "SharpnessIncreasing": (_enhance_increasing, _sharpness),
  "ShearX": (_shear_level, lambda img, f, fill, rs: _affine(img, (1, f, 0, 0, 1, 0), fill, rs)),
  "ShearY": (_shear_level, lambda img, f, fill, rs: _affine(img, (1, 0, 0, f, 1, 0), fill, rs)),
  "TranslateX": (_translate_abs_level, lambda img, px, fill, rs: _affine(img, (1, 0, px, 0, 1, 0), fill, rs)),
  "TranslateY": (_translate_abs_level, lambda img, px, fill, rs: _affine(img, (1, 0, 0, 0, 1, px), fill, rs)),
  "TranslateXRel": (
    _translate_rel_level,
    lambda img, pct, fill, rs: _affine(img, (1, 0, pct * img.width, 0, 1, 0), fill, rs),
  ),
  "TranslateYRel": (
    _translate_rel_level,
    lambda img, pct, fill, rs: _affine(img, (1, 0, 0, 0, 1, pct * img.height), fill, rs),
  ),
}
OP_NAMES = tuple(_OPS)


def apply_op(
  img: Image.Image,
  name: str,
  magnitude: float,
  rng: np.random.Generator,
  *,
  fill: tuple[int, ...] | None = None,
  translate_const: int | None = None,
  resample: Image.Resampling = BICUBIC,
) -> Image.Image:
  """One RandAugment op at `magnitude` (clipped to [0, 10]); `rng` only draws the sign of signed arguments.

  Defaults are the hparams `create_transform` gives RandAugment: fill = the ImageNet mean in uint8, `translate_const`
  = int(0.45 * shorter side) (used by the absolute TranslateX/Y only), resampling = the crop's interpolation.
  """
  if name not in _OPS:
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {OP_NAMES}")
  level_fn, op = _OPS[name]
  magnitude = min(_MAX_LEVEL, max(0.0, magnitude))
  if translate_const is None:
    translate_const = int(min(img.size) * 0.45)
  arg = level_fn(magnitude, rng, translate_const) if level_fn is not None else None
  return op(img, arg, imagenet_fill() if fill is None else fill, resample)


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """A parsed `rand-...` spec; the defaults are timm's for sections the spec leaves out."""

  magnitude: int = 10
  num_layers: int = 2
  magnitude_std: float = 0.0
  increasing: bool = False
  weights: tuple[float, ...] | None = None  # op choice probabilities ('w0'); ops are then drawn without replacement

  @property
  def ops(self) -> tuple[str, ...]:
    return _RAND_INCREASING_TRANSFORMS if self.increasing else _RAND_TRANSFORMS


_SPEC_HELP = "expected 'rand' followed by '-'-separated sections m<int>, n<int>, mstd<float>, inc<0|1>, w0"


@functools.lru_cache(maxsize=64)
def parse_rand_augment(spec: str) -> RandAugmentConfig:
  """Parse timm's RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' (magnitude 9 ± N(0, 0.5), increasing ops, 2 layers).

  Two departures from timm 0.4.12, which silently skips a section without a digit and turns 'inc0' on (it tests
  `bool('0')`): here the first is an error and 'inc0' means off.
  """
  sections = spec.split("-")
  if sections[0] != "rand":
    raise ValueError(f"randaugment={spec!r}: {_SPEC_HELP}")
  fields = {}
  try:
    for section in sections[1:]:
      match = re.fullmatch(r"(\D*)(\d.*)", section)  # as timm: the key is what precedes the first digit
      if match is None:
        raise ValueError(f"section {section!r} has no numeric value")
      key, val = match.groups()
      if key == "m":
        fields["magnitude"] = int(val)
      elif key == "n":
        fields["num_layers"] = int(val)
      elif key == "mstd":
        fields["magnitude_std"] = float(val)
      elif key == "inc":
        fields["increasing"] = bool(int(val))
      elif key == "w" and int(val) == 0:
        weights = [_RAND_CHOICE_WEIGHTS_0[name] for name in _RAND_TRANSFORMS]
        fields["weights"] = tuple(w / sum(weights) for w in weights)
      else:
        raise ValueError(f"unknown section {section!r}")
  except ValueError as e:
    raise ValueError(f"randaugment={spec!r}: {e}; {_SPEC_HELP}") from None
  return RandAugmentConfig(**fields)


def rand_augment(
  img: Image.Image,
  rng: np.random.Generator,
  spec: str,
  *,
  fill: tuple[int, ...] | None = None,
  translate_const: int | None = None,
  resample: Image.Resampling = BICUBIC,
) -> Image.Image:
  """timm `RandAugment`: `n` ops drawn uniformly with replacement, each applied with probability 0.5 at magnitude
  m (or m + N(0, mstd) when mstd > 0, clipped to [0, 10]). Keyword arguments as in `apply_op`."""
  cfg = parse_rand_augment(spec)
  ops = cfg.ops
  chosen = rng.choice(len(ops), cfg.num_layers, replace=cfg.weights is None, p=cfg.weights)
  for i in chosen:
    if rng.random() > 0.5:
      continue
    magnitude = cfg.magnitude
    if cfg.magnitude_std > 0:
      magnitude = rng.normal(magnitude, cfg.magnitude_std)
    img = apply_op(img, ops[i], magnitude, rng, fill=fill, translate_const=translate_const, resample=resample)
  return img


# ------------------------------------------------------------------------------------------------
# RandomErasing (timm/data/random_erasing.py), on the normalized image


def random_erasing(
  x: np.ndarray,
  rng: np.random.Generator,
  prob: float,
  *,
  min_area: float = 0.02,
  max_area: float = 1 / 3,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  mode: str = "pixel",
  max_count: int = 1,
) -> np.ndarray:
  """With probability `prob`, overwrite 1..max_count boxes (area fraction U(min, max) / count, log-uniform aspect,
  10 tries each) of the normalized float HWC image with N(0, 1) noise: per pixel ('pixel'), per box and channel
  ('rand'), or zeros ('const'). Returns a new array when it erases, else `x` itself."""
  if mode not in ("pixel", "rand", "const"):
    raise ValueError(f"random erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  if rng.random() > prob:
    return x
  img_h, img_w, chan = x.shape
  log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
  count = 1 if max_count == 1 else int(rng.integers(1, max_count + 1))
  x = x.copy()
  for _ in range(count):
    for _ in range(10):
      target_area = rng.uniform(min_area, max_area) * img_h * img_w / count
      aspect = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(target_area * aspect)))
      w = int(round(math.sqrt(target_area / aspect)))
      if w < img_w and h < img_h:
        top = int(rng.integers(0, img_h - h + 1))
        left = int(rng.integers(0, img_w - w + 1))
        if mode == "pixel":
          x[top : top + h, left : left + w] = rng.standard_normal((h, w, chan), dtype=np.float32)
        elif mode == "rand":
          x[top : top + h, left : left + w] = rng.standard_normal(chan, dtype=np.float32)
        else:
          x[top : top + h, left : left + w] = 0.0
        break
  return x


# ------------------------------------------------------------------------------------------------
# Full transforms


def train_transform(
  image: np.ndarray,
  rng: np.random.Generator,
  *,
  image_size: int,
  scale: Sequence[float] = (0.08, 1.0),
  ratio: Sequence[float] = (3 / 4, 4 / 3),
  hflip: float = 0.5,
  randaugment: str | None = "rand-m9-mstd0.5-inc1",
  re_prob: float = 0.25,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
  """uint8 HWC (or grayscale HW / HW1) -> float32 (image_size, image_size, 3), the Vim/DeiT training augmentation.

  RandAugment gets the hparams `create_transform` passes: translate_const = int(0.45 * image_size), fill = the mean
  in uint8, and the crop's bicubic resampling for its geometric ops.
  """
  img = random_resized_crop(to_pil_rgb(image), rng, image_size, scale, ratio, BICUBIC)
  if hflip > 0 and rng.random() < hflip:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if randaugment:
    img = rand_augment(
      img, rng, randaugment, fill=imagenet_fill(mean), translate_const=int(image_size * 0.45), resample=BICUBIC
    )
  x = normalize(img, mean, std)
  if re_prob > 0:
    x = random_erasing(x, rng, re_prob, mode="pixel")
  return x


def eval_transform(
  image: np.ndarray,
  *,
  image_size: int,
  crop_ratio: float = 0.875,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
  """Shorter side to int(image_size / crop_ratio) (bicubic, as torchvision `Resize(int)`), center crop, normalize."""
  if not 0 < crop_ratio <= 1:
    raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
  img = to_pil_rgb(image)
  size = int(image_size / crop_ratio)
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short != size:
    new_long = int(size * long / short)
    img = img.resize((size, new_long) if w <= h else (new_long, size), BICUBIC)
  w, h = img.size
  top = int(round((h - image_size) / 2.0))
  left = int(round((w - image_size) / 2.0))
  return normalize(img.crop((left, top, left + image_size, top + image_size)), mean, std)
