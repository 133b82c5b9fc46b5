"""Image and dataset helpers in pure numpy (no Pillow, no torch).

The models were trained with torchvision transforms on PIL images, so the
preprocessing here reproduces PIL's behaviour rather than a generic bilinear
resize:

* ``pil_resize`` follows PIL's separable resampler for 8-bit images: a triangle
  filter whose support widens when downscaling (antialiasing), fixed-point
  coefficients with 22 fractional bits, and a rounding to uint8 after the
  horizontal pass and again after the vertical pass.
* ``read_png`` decodes the plain 8-bit, non-interlaced PNGs we ship.
* ``read_idx`` reads the MNIST IDX files.

Command line: ``python tools/imgproc.py mnist-svhn IMAGES LABELS COUNT OUT.npy``
writes the first COUNT test digits preprocessed for the SVHN network.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ccexam/constants.py
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
USPS_MEAN = (0.2471,)
USPS_STD = (0.2994,)

_PRECISION_BITS = 32 - 8 - 2  # PIL's fixed-point precision for 8-bit images


# --------------------------------------------------------------------------- IDX

def read_idx(path) -> np.ndarray:
    """Read an (uncompressed) IDX file such as ``t10k-images-idx3-ubyte``."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} elements, found {arr.size}")
    return arr.reshape(dims).astype(arr.dtype.newbyteorder("="))


# --------------------------------------------------------------------------- PNG

def read_png(path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG to a ``[H, W, C]`` uint8 array.

    Supports grayscale, RGB, gray+alpha and RGBA; palette images, 16-bit depth
    and Adam7 interlacing are rejected with a clear error.
    """
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: missing IHDR")
    width, height, depth, color, _, _, interlace = header
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace != 0:
        raise ValueError(f"{path}: only 8-bit non-palette non-interlaced PNGs are supported "
                         f"(depth={depth}, color type={color}, interlace={interlace})")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{path}: decompressed size mismatch")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    bpp = channels
    for y in range(height):
        ftype, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if ftype == 0:  # None
            cur = line
        elif ftype == 2:  # Up
            cur = (line + prev) & 0xFF
        elif ftype in (1, 3, 4):  # Sub, Average, Paeth depend on the pixel to the left: go pixel by pixel
            cur = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                if ftype == 1:
                    pred = a
                elif ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = prev[x - bpp] if x >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) & 0xFF
        else:
            raise ValueError(f"{path}: bad PNG filter type {ftype} on row {y}")
        out[y] = cur
        prev = cur
    return out.reshape(height, width, channels)


# --------------------------------------------------------------------------- resize

def _pil_coeffs(in_size: int, out_size: int):
    """PIL's bilinear resampling coefficients for one axis, as fixed-point ints.

    Returns (bounds, weights): for output i, input pixels bounds[i] .. bounds[i]+n
    with integer weights summing to about 2**22.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear (triangle) filter has support 1
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            k.append(1.0 - t if t < 1.0 else 0.0)
        total = sum(k)
        if total != 0.0:
            k = [w / total for w in k]
        bounds[xx] = xmin
        for x, w in enumerate(k):
            # int() truncates toward zero, as the C cast in PIL does.
            weights[xx, x] = int(0.5 + w * (1 << _PRECISION_BITS)) if w >= 0 else int(-0.5 + w * (1 << _PRECISION_BITS))
    return bounds, weights


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample a uint8 ``[H, W, C]`` image along ``axis`` (0 = rows, 1 = columns)."""
    in_size = img.shape[axis]
    bounds, weights = _pil_coeffs(in_size, out_size)
    src = np.moveaxis(img.astype(np.int64), axis, 0)  # [in, other, C]
    # Pad so every window of ksize taps is in range; padded taps carry zero weight.
    pad = weights.shape[1]
    src = np.concatenate([src, np.zeros((pad,) + src.shape[1:], dtype=np.int64)], axis=0)
    acc = np.full((out_size,) + src.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int64)
    for j in range(weights.shape[1]):
        acc += src[bounds + j] * weights[:, j][:, None, None]
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def pil_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize like ``PIL.Image.resize((width, height), Image.BILINEAR)`` on 8-bit data.

    ``img`` is ``[H, W]`` or ``[H, W, C]`` uint8; the result has the same layout.
    """
    squeeze = img.ndim == 2
    if squeeze:
        img = img[:, :, None]
    if img.dtype != np.uint8:
        raise TypeError("pil_resize expects uint8 pixels")
    # PIL does the horizontal pass first, rounding to uint8 in between.
    if img.shape[1] != width:
        img = _resample_axis(img, width, axis=1)
    if img.shape[0] != height:
        img = _resample_axis(img, height, axis=0)
    return img[:, :, 0] if squeeze else img


# --------------------------------------------------------------------------- pipelines

def normalize(chw_u8: np.ndarray, mean, std) -> np.ndarray:
    """``ToTensor`` + ``Normalize``: uint8 ``[..., C, H, W]`` -> float32."""
    x = chw_u8.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return ((x - m) / s).astype(np.float32)


def imagenet_preprocess(rgb: np.ndarray, mean=None, std=None) -> np.ndarray:
    """torchvision's ImageNet eval transform: Resize(256), CenterCrop(224), normalize (ImageNet's
    mean and std unless given, on a 0..1 scale).

    ``rgb`` is ``[H, W, 3]`` uint8; returns ``[3, 224, 224]`` float32.
    """
    h, w = rgb.shape[:2]
    short, long_ = (h, w) if h <= w else (w, h)
    new_short, new_long = 256, int(256 * long_ / short)  # torchvision truncates the long side
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    img = pil_resize(rgb[:, :, :3], new_w, new_h)
    top = int(round((new_h - 224) / 2.0))
    left = int(round((new_w - 224) / 2.0))
    img = img[top : top + 224, left : left + 224]
    return normalize(img.transpose(2, 0, 1), IMAGENET_MEAN if mean is None else mean,
                     IMAGENET_STD if std is None else std)


def _resize_batch(images_u8: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize ``[N, H, W]`` uint8 images at once (the batch rides in the channel axis)."""
    return pil_resize(np.ascontiguousarray(images_u8.transpose(1, 2, 0)), width, height).transpose(2, 0, 1)


def mnist_for_svhn(images_u8: np.ndarray) -> np.ndarray:
    """MNIST digits ``[N, 28, 28]`` uint8 -> SVHN network input ``[N, 3, 32, 32]`` float32.

    Mirrors ccexam's transform for a grayscale PIL image fed to the SVHN model:
    Resize(32) bilinear on the 8-bit image, convert("RGB") (gray copied to 3
    channels), ToTensor, Normalize(SVHN mean, std).
    """
    resized = _resize_batch(images_u8, 32, 32)
    rgb = np.repeat(resized[:, None, :, :], 3, axis=1)
    return normalize(rgb, SVHN_MEAN, SVHN_STD)


def mnist_for_mnist(images_u8: np.ndarray) -> np.ndarray:
    """MNIST digits -> MNISTNet input ``[N, 1, 28, 28]`` (Resize(28) is the identity)."""
    return normalize(images_u8[:, None, :, :], MNIST_MEAN, MNIST_STD)


def mnist_for_usps(images_u8: np.ndarray) -> np.ndarray:
    """MNIST digits -> USPSNet input ``[N, 1, 16, 16]`` (downscaled, USPS stats)."""
    resized = _resize_batch(images_u8, 16, 16)
    return normalize(resized[:, None, :, :], USPS_MEAN, USPS_STD)


def write_mnist_svhn_batch(images_path, labels_path, count: int, out_path, labels_out=None):
    """Write the first ``count`` digits, preprocessed for SVHN, as a float32 .npy."""
    images = read_idx(images_path)[:count]
    labels = read_idx(labels_path)[:count]
    batch = mnist_for_svhn(images)
    assert batch.shape == (len(images), 3, 32, 32) and batch.dtype == np.float32
    np.save(out_path, batch)
    if labels_out is not None:
        np.save(labels_out, labels.astype(np.int64))
    return batch, labels


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "mnist-svhn":
        _, _, imgs, lbls, n, out = sys.argv
        write_mnist_svhn_batch(imgs, lbls, int(n), out)
    else:
        sys.exit("usage: imgproc.py mnist-svhn IMAGES_IDX LABELS_IDX COUNT OUT.npy")
