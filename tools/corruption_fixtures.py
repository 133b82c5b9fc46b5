#!/usr/bin/env python3
"""Reference fixtures for the shift-schedule corruptions (cli/src/stream/corrupt.rs).

Runs the `imagecorruptions` package (v1.1.2, the ImageNet-C code packaged for arbitrary image
sizes) on three small test images and writes what cli/tests/stream_corrupt.rs compares
against into tests/fixtures/corrupt/:

  inputs/<image>.png                the clean images: digit32 (MNIST test digit 0, PIL bilinear
                                    28->32, gray copied to RGB), photo32 (chelsea.png, PIL box
                                    resize to 32x32) and photo64x48 (coffee.png, box resize to
                                    64x48, non-square on purpose)
  expected/<image>/<name>_<s>.png   deterministic corruptions, every severity: brightness,
                                    contrast, defocus_blur, pixelate, jpeg_compression, and
                                    motion_blur at a fixed angle (the package draws the angle
                                    uniformly in [-45, 45]; the blur given the angle is
                                    deterministic: `_motion_blur` with the severity's radius and
                                    sigma, clipped and cast as `corrupt` does)
  fog/photo32_s<s>_map.npy + .png   a plasma-fractal map drawn by the package and the fog image
                                    made from it (severities 1 and 5) (the composition given the map is deterministic)
  stats.json                        statistics of the random corruptions (gaussian_noise,
                                    shot_noise, impulse_noise, fog, motion_blur with its random
                                    angle) over DRAWS draws per image and severity: for each
                                    statistic the mean over draws and the standard deviation of
                                    one draw's value, so the Rust test can bound the difference of
                                    two sample means by their standard errors

The statistics are computed per draw on the uint8 output `out` and input `inp` (float64, all
H*W*3 values): resid_mean = mean(out - inp), resid_sq = mean((out - inp)^2), frac_0 /
frac_255 = fraction of values equal to 0 / 255, frac_same = fraction with out == inp, mean_abs
= mean |out - inp|, out_mean / out_std = mean / population std of out, hgrad / vgrad = mean
|difference| of horizontally / vertically adjacent values of out.

imagecorruptions 1.1.2 calls `np.float_`, which NumPy 2 removed; the alias to float64 is restored
before importing it (same dtype, no change in behaviour).

    python3 -m venv /tmp/icvenv && /tmp/icvenv/bin/pip install imagecorruptions==1.1.2
    /tmp/icvenv/bin/python tools/corruption_fixtures.py      # needs assets/ (tools/setup.sh)

The corruptions added later (zoom_blur, glass_blur, elastic_transform, snow, frost and the extras
gaussian_blur, speckle_noise, saturate, spatter) are written by the same run, or alone with `--later
[NAME...]` (all of them without names), which leaves every other file as it is and merges their
statistics into stats.json:

  expected/<image>/<name>_<s>.png   zoom_blur, gaussian_blur and saturate, every severity
  elastic/photo32_s<s>_d{x,y}.npy   an elastic_transform displacement field drawn as the package
    + elastic/photo32_s<s>.png      draws it (float32) and the image the package's arithmetic
                                    makes with it (severities 1 and 5); the script checks that
                                    arithmetic against `corrupt` itself on the same draws
  snow/<image>_s<s>_draws.npy       snow's flake draws (float64, numpy's normal with the severity's
    + snow/<image>_s<s>.png         mean and sigma) and, in angles.json, its streak angle, drawn as
    + snow/angles.json              the package draws them, and the package's own output on those
                                    draws (severities 1, 3, 5)
  frost/draws.json                  frost's draws per image and severity (the photograph, the crop's
    + frost/<image>_s<s>.png        row and column), drawn as the package draws them, and the
                                    package's own output on those draws (every severity); the
                                    script checks its replication of the crop against `corrupt`
    + frost/<image>_s5_ipp.png      the same at severity 5 with OpenCV's Intel IPP path (below)
  frost/rescaled.json               SHA-256 of OpenCV's INTER_CUBIC rescaling of each of the five
                                    photographs (RGB, row-major) for a 32x32 image (1.1 times the
                                    photograph) and for a 400x1000 one (a factor that covers it),
                                    and how many values the IPP path gives otherwise
  frost/resize_<case>_{in,out}.npy  OpenCV's resize(INTER_CUBIC) of small random RGB images to
                                    sizes up and down, vector widths and scalar tails included
  spatter/<image>_s<s>_draws.npy    spatter's normal draws (float64), drawn as the package draws
    + spatter/<image>_s<s>.png      them, and the package's output on them (every severity, IPP
                                    off); ipp_differing.json counts the values IPP on changes
  spatter/digit32_s2_ipp_*          the first digit draw at severity 2 of SPATTER_IPP_SEARCH on
                                    which IPP's float32 distance transform changes the output
  spatter/ops_<case>_{u8,f32}.npy   OpenCV's steps of spatter's water branch on random planes

OpenCV's x86 wheels resize through Intel IPP when it is on (the default there): IPP's cubic
kernel is not OpenCV's own fixed-point one (11-bit weights) but rounds nearly as exact arithmetic
does, so 3-5 % of the rescaled photographs' values come out one level apart (OpenCV 4.10 and 5.1
alike; counts in rescaled.json). Every frost fixture but the `_ipp` ones is made with
`cv2.ipp.setUseIPP(False)`: OpenCV's own arithmetic, what it computes wherever IPP is absent
(ARM phones and laptops, builds without IPP), which cli/src/stream/corrupt/frost.rs reproduces.
  stats.json                        snow, glass_blur, elastic_transform, speckle_noise (LATER_RANDOM)

glass_blur and gaussian_blur call scikit-image's `gaussian(..., multichannel=True)`, which
scikit-image 0.19 replaced by `channel_axis`: the script points the package's `gaussian` at a
wrapper that passes `channel_axis=-1` instead (the same filter).
"""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

if not hasattr(np, "float_"):
    np.float_ = np.float64  # removed in NumPy 2; imagecorruptions' plasma_fractal still names it

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
OUT = ROOT / "tests" / "fixtures" / "corrupt"

SEED = 20240611
DRAWS = 400
SEVERITIES = (1, 2, 3, 4, 5)
FOG_SEVERITIES = (1, 5)  # the fog-given-its-map check: two severities keep the fixtures small
DETERMINISTIC = ("brightness", "contrast", "defocus_blur", "pixelate", "jpeg_compression")
MOTION_ANGLES = {"digit32": -38.7, "photo32": 27.3, "photo64x48": 12.5}
MOTION_PARAMS = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]  # (radius, sigma), as motion_blur
RANDOM = {
    "gaussian_noise": ("resid_mean", "resid_sq", "frac_0", "frac_255"),
    "shot_noise": ("resid_mean", "resid_sq", "frac_0", "frac_255"),
    "impulse_noise": ("frac_0", "frac_255", "frac_same"),
    "fog": ("out_mean", "out_std", "hgrad", "vgrad"),
    "motion_blur": ("mean_abs", "hgrad", "vgrad"),
}
STAT_IMAGES = ("digit32", "photo32")
LATER_DETERMINISTIC = ("zoom_blur", "gaussian_blur", "saturate")
LATER_RANDOM = {
    "snow": ("out_mean", "out_std", "hgrad", "vgrad"),
    "glass_blur": ("mean_abs", "hgrad", "vgrad"),
    "elastic_transform": ("mean_abs", "out_mean", "hgrad", "vgrad"),
    "speckle_noise": ("resid_mean", "resid_sq", "frac_0", "frac_255"),
}
ELASTIC_SEVERITIES = (1, 5)
SNOW_SEVERITIES = (1, 3, 5)
FROST_FILES = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
FROST_LARGE = (400, 1000)  # an image wider than every photograph: the package scales them up
# (input height, width) -> (output height, width): OpenCV's resize(INTER_CUBIC), uint8 RGB
RESIZE_CASES = [((5, 7), (9, 12)), ((20, 33), (23, 37)), ((31, 40), (35, 45)), ((16, 16), (7, 11)),
                ((13, 29), (40, 64))]
SNOW_PARAMS = [(0.1, 0.3), (0.2, 0.3), (0.55, 0.3), (0.55, 0.3), (0.55, 0.3)]  # (loc, scale) of its draws


def read_idx_images(path: Path) -> np.ndarray:
    data = path.read_bytes()
    n, h, w = (int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def inputs() -> dict[str, np.ndarray]:
    from PIL import Image
    digit = read_idx_images(ASSETS / "mnist" / "t10k-images-idx3-ubyte")[0]
    digit32 = np.array(Image.fromarray(digit).resize((32, 32), Image.BILINEAR).convert("RGB"))
    cat = Image.open(ASSETS / "photos" / "chelsea.png").convert("RGB")
    coffee = Image.open(ASSETS / "photos" / "coffee.png").convert("RGB")
    photo32 = np.array(cat.resize((32, 32), Image.BOX))
    photo64x48 = np.array(coffee.resize((64, 48), Image.BOX))
    return {"digit32": digit32, "photo32": photo32, "photo64x48": photo64x48}


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, optimize=True)


def assert_no_rounding_ties(radius: int, angle: float) -> None:
    """The blur's pixel shifts are ceil(i*sin/|.| - 0.5): an angle whose offsets land within
    1e-9 of an integer would make the fixture depend on the last bit of sin and hypot."""
    import math
    width = 2 * radius + 1
    p = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    h = math.hypot(*p)
    for i in range(width):
        for q in p:
            t = i * q / h - 0.5
            if i and abs(t - round(t)) < 1e-9:
                raise AssertionError(f"angle {angle}: offset {t} of tap {i} is a rounding tie")


def stat_values(names, inp: np.ndarray, out: np.ndarray) -> list[float]:
    x = inp.astype(np.float64)
    y = out.astype(np.float64)
    d = y - x
    table = {
        "resid_mean": lambda: d.mean(),
        "resid_sq": lambda: (d * d).mean(),
        "frac_0": lambda: (out == 0).mean(),
        "frac_255": lambda: (out == 255).mean(),
        "frac_same": lambda: (out == inp).mean(),
        "mean_abs": lambda: np.abs(d).mean(),
        "out_mean": lambda: y.mean(),
        "out_std": lambda: y.std(),
        "hgrad": lambda: np.abs(y[:, 1:] - y[:, :-1]).mean(),
        "vgrad": lambda: np.abs(y[1:] - y[:-1]).mean(),
    }
    return [float(table[n]()) for n in names]


def random_stats(corrupt, img, c, names) -> dict:
    """Per severity, each statistic's mean over DRAWS draws of corruption `c` and one draw's
    standard deviation."""
    out = {}
    for s in SEVERITIES:
        rows = np.array([stat_values(names, img, corrupt(img, severity=s, corruption_name=c)) for _ in range(DRAWS)])
        out[str(s)] = {n: {"mean": float(rows[:, i].mean()), "std": float(rows[:, i].std(ddof=1))}
                       for i, n in enumerate(names)}
    return out


def patch_gaussian(module) -> None:
    """The package's `gaussian(x, sigma=..., multichannel=True)` on a scikit-image that only
    knows `channel_axis` (0.19 and later)."""
    from skimage.filters import gaussian

    def compat(image, sigma=1, multichannel=None, **kw):
        if multichannel:
            kw["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kw)
    module.gaussian = compat


def elastic_fields(shape, severity):
    """elastic_transform's two displacement fields, drawn and computed as the package does."""
    from skimage.filters import gaussian
    sigma = np.array(shape[:2]) * 0.01
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][severity - 1]
    max_dx = shape[0] * 0.005
    max_dy = shape[0] * 0.005
    dx = (gaussian(np.random.uniform(-max_dx, max_dx, size=shape[:2]), sigma, mode="reflect", truncate=3)
          * alpha).astype(np.float32)
    dy = (gaussian(np.random.uniform(-max_dy, max_dy, size=shape[:2]), sigma, mode="reflect", truncate=3)
          * alpha).astype(np.float32)
    return dx, dy


def elastic_given(img, dx, dy):
    """elastic_transform's warp given its fields: the package's arithmetic, cast as `corrupt` does."""
    from scipy.ndimage import map_coordinates
    image = np.array(img, dtype=np.float32) / 255.
    shape = image.shape
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = (np.reshape(y + dy[..., None], (-1, 1)), np.reshape(x + dx[..., None], (-1, 1)),
               np.reshape(z, (-1, 1)))
    out = np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255
    return np.uint8(out)


def frost_rescaled(frost: np.ndarray, shape) -> np.ndarray:
    """The package's rescaling of a frost photograph (BGR, as cv2.imread gives it) for an image of
    `shape`, replicated from `frost` in imagecorruptions 1.1.2."""
    import cv2

    fs, xs = frost.shape, shape
    factor = 1
    if fs[0] >= xs[0] and fs[1] >= xs[1]:
        factor = 1
    elif fs[0] < xs[0] and fs[1] >= xs[1]:
        factor = xs[0] / fs[0]
    elif fs[0] >= xs[0] and fs[1] < xs[1]:
        factor = xs[1] / fs[1]
    else:
        factor = np.maximum(xs[0] / fs[0], xs[1] / fs[1])
    factor *= 1.1
    size = (int(np.ceil(fs[1] * factor)), int(np.ceil(fs[0] * factor)))
    return cv2.resize(frost, dsize=size, interpolation=cv2.INTER_CUBIC)


def write_frost(imgs, corrupt) -> None:
    """frost's fixtures (see the docstring)."""
    import hashlib
    from importlib.resources import files

    import cv2

    textures = [cv2.imread(str(files("imagecorruptions") / "frost" / f)) for f in FROST_FILES]
    (OUT / "frost").mkdir(parents=True, exist_ok=True)
    draws, out = {}, {}
    for name, img in imgs.items():
        for s in SEVERITIES:
            state = np.random.get_state()
            if s == 5:  # the same draws with IPP on
                cv2.ipp.setUseIPP(True)
                ipp = np.uint8(corrupt(img, severity=s, corruption_name="frost"))
                save_png(OUT / "frost" / f"{name}_s5_ipp.png", ipp)
                np.random.set_state(state)
            cv2.ipp.setUseIPP(False)
            want = np.uint8(corrupt(img, severity=s, corruption_name="frost"))
            if s == 5:
                draws[f"{name}_s5_ipp_differing"] = int((want != ipp).sum())
            np.random.set_state(state)
            idx = int(np.random.randint(5))
            rescaled = frost_rescaled(textures[idx], img.shape)
            top = int(np.random.randint(0, rescaled.shape[0] - img.shape[0]))
            left = int(np.random.randint(0, rescaled.shape[1] - img.shape[1]))
            crop = rescaled[top:top + img.shape[0], left:left + img.shape[1]][..., [2, 1, 0]]
            c = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][s - 1]
            got = np.uint8(np.clip(c[0] * np.array(img) + c[1] * crop, 0, 255))
            assert np.array_equal(got, want), f"frost:{s} on {name}: the replicated crop differs from the package"
            draws[f"{name}_s{s}"] = {"texture": idx, "top": top, "left": left}
            save_png(OUT / "frost" / f"{name}_s{s}.png", want)
    (OUT / "frost" / "draws.json").write_text(json.dumps(draws, indent=1) + "\n")
    for label, shape in (("32x32", (32, 32)), (f"{FROST_LARGE[1]}x{FROST_LARGE[0]}", FROST_LARGE)):
        out[label] = []
        for t in textures:
            r = np.ascontiguousarray(frost_rescaled(t, shape)[..., [2, 1, 0]])
            cv2.ipp.setUseIPP(True)
            ipp = np.ascontiguousarray(frost_rescaled(t, shape)[..., [2, 1, 0]])
            cv2.ipp.setUseIPP(False)
            out[label].append({"height": r.shape[0], "width": r.shape[1],
                               "sha256": hashlib.sha256(r.tobytes()).hexdigest(),
                               "ipp_differing": int((ipp != r).sum()),
                               "ipp_max_difference": int(np.abs(ipp.astype(int) - r).max())})
    (OUT / "frost" / "rescaled.json").write_text(json.dumps(out, indent=1) + "\n")
    rng = np.random.default_rng(SEED)
    for (ih, iw), (oh, ow) in RESIZE_CASES:
        x = rng.integers(0, 256, size=(ih, iw, 3), dtype=np.uint8)
        case = f"{iw}x{ih}_{ow}x{oh}"
        np.save(OUT / "frost" / f"resize_{case}_in.npy", x)
        np.save(OUT / "frost" / f"resize_{case}_out.npy", cv2.resize(x, dsize=(ow, oh), interpolation=cv2.INTER_CUBIC))


SPATTER_PARAMS = [(0.65, 0.3), (0.65, 0.3), (0.65, 0.3), (0.65, 0.3), (0.67, 0.4)]  # (loc, scale) of its draws
SPATTER_KERNEL = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])  # the package's filter2D kernel
# (height, width) of the random inputs of spatter's OpenCV steps, scalar tails and vector widths
SPATTER_OP_SHAPES = [(32, 32), (33, 47), (48, 64), (40, 19)]
SPATTER_IPP_SEARCH = 1000
SPATTER_OPS_U8 = ("u8", "canny", "d8", "equalized", "filtered", "blurred8")
SPATTER_OPS_F32 = ("dist", "blurred")


def spatter_ops(rng) -> dict:
    """Inputs and OpenCV's outputs of each step of spatter's water branch, on random images (the
    liquid layer as spatter makes it, and uniform noise), IPP off."""
    import cv2
    from skimage.filters import gaussian
    cases = {}
    for k, (h, w) in enumerate(SPATTER_OP_SHAPES):
        sigma = 1 + k % 4
        layer = gaussian(rng.normal(0.65, 0.3, (h, w)), sigma=sigma)
        layer[layer < 0.68] = 0
        for kind, u8 in (("liquid", (layer * 255).astype(np.uint8)),
                         ("noise", rng.integers(0, 256, (h, w), dtype=np.uint8))):
            canny = cv2.Canny(u8, 50, 150)
            dist = cv2.distanceTransform(255 - canny, cv2.DIST_L2, 5)
            _, trunc = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
            blurred = cv2.blur(trunc, (3, 3))
            d8 = blurred.astype(np.uint8)
            cases[f"{kind}{h}x{w}"] = {
                "u8": u8, "canny": canny, "dist": dist, "blurred": blurred, "d8": d8,
                "equalized": cv2.equalizeHist(d8),
                # filter2D and the 8-bit blur on the noise too: saturation both ways
                "filtered": cv2.filter2D(u8, cv2.CV_8U, SPATTER_KERNEL),
                "blurred8": cv2.blur(u8, (3, 3)),
            }
    return cases


def write_spatter(imgs, corrupt) -> None:
    """spatter's fixtures (see the docstring)."""
    import cv2
    d = OUT / "spatter"
    d.mkdir(parents=True, exist_ok=True)

    def both(img, s):
        """The package's output with IPP off and on, on the same draws; and the draws."""
        state = np.random.get_state()
        cv2.ipp.setUseIPP(True)
        ipp = np.uint8(corrupt(img, severity=s, corruption_name="spatter"))
        np.random.set_state(state)
        cv2.ipp.setUseIPP(False)
        own = np.uint8(corrupt(img, severity=s, corruption_name="spatter"))
        np.random.set_state(state)
        loc, scale = SPATTER_PARAMS[s - 1]
        draws = np.random.normal(size=img.shape[:2], loc=loc, scale=scale)
        return own, ipp, draws

    counts = {}
    for name, img in imgs.items():
        for s in SEVERITIES:
            own, ipp, draws = both(img, s)
            np.save(d / f"{name}_s{s}_draws.npy", draws.astype(np.float64))
            save_png(d / f"{name}_s{s}.png", own)
            counts[f"{name}_s{s}"] = int((own != ipp).sum())
    # A draw on which IPP's distance transform (float32 steps of 1, 1.4 and 2.1969 where OpenCV's
    # own sums 16.16 fixed-point ones) changes the output: the first of SPATTER_IPP_SEARCH draws.
    img = imgs["digit32"]
    for _ in range(SPATTER_IPP_SEARCH):
        own, ipp, draws = both(img, 2)
        if (own != ipp).any():
            np.save(d / "digit32_s2_ipp_draws.npy", draws.astype(np.float64))
            save_png(d / "digit32_s2_ipp_own.png", own)
            save_png(d / "digit32_s2_ipp.png", ipp)
            counts["digit32_s2_ipp"] = int((own != ipp).sum())
            break
    else:
        raise AssertionError(f"spatter: no draw of {SPATTER_IPP_SEARCH} where IPP changes the output")
    (d / "ipp_differing.json").write_text(json.dumps(counts, indent=1) + "\n")
    cv2.ipp.setUseIPP(False)
    for case, arrays in spatter_ops(np.random.default_rng(SEED)).items():
        # one 8-bit and one float32 stack per case, planes in SPATTER_OPS_U8 / SPATTER_OPS_F32 order
        np.save(d / f"ops_{case}_u8.npy", np.stack([arrays[k] for k in SPATTER_OPS_U8]))
        np.save(d / f"ops_{case}_f32.npy", np.stack([arrays[k] for k in SPATTER_OPS_F32]))
    cv2.ipp.setUseIPP(True)


def write_later(imgs, corrupt, stats, names) -> None:
    """The files of the corruptions added later that are in `names`."""
    for name, img in imgs.items():
        for c in LATER_DETERMINISTIC:
            if c in names:
                for s in SEVERITIES:
                    save_png(OUT / "expected" / name / f"{c}_{s}.png", corrupt(img, severity=s, corruption_name=c))
    if "elastic_transform" in names:
        img = imgs["photo32"]
        (OUT / "elastic").mkdir(parents=True, exist_ok=True)
        for s in ELASTIC_SEVERITIES:
            state = np.random.get_state()
            want = corrupt(img, severity=s, corruption_name="elastic_transform")
            np.random.set_state(state)
            dx, dy = elastic_fields(img.shape, s)
            got = elastic_given(img, dx, dy)
            assert np.array_equal(got, want), f"elastic_transform:{s}: the replicated arithmetic differs from the package"
            np.save(OUT / "elastic" / f"photo32_s{s}_dx.npy", dx)
            np.save(OUT / "elastic" / f"photo32_s{s}_dy.npy", dy)
            save_png(OUT / "elastic" / f"photo32_s{s}.png", got)
    if "snow" in names:
        # snow draws its flakes (numpy's normal over the image's height x width), then the streak's
        # angle (uniform in [-135, -45]); the rest is deterministic given both.
        (OUT / "snow").mkdir(parents=True, exist_ok=True)
        angles = {}
        for name, img in imgs.items():
            for s in SNOW_SEVERITIES:
                state = np.random.get_state()
                want = corrupt(img, severity=s, corruption_name="snow")
                np.random.set_state(state)
                loc, scale = SNOW_PARAMS[s - 1]
                draws = np.random.normal(size=img.shape[:2], loc=loc, scale=scale)
                angles[f"{name}_s{s}"] = float(np.random.uniform(-135, -45))
                np.save(OUT / "snow" / f"{name}_s{s}_draws.npy", draws.astype(np.float64))
                save_png(OUT / "snow" / f"{name}_s{s}.png", np.uint8(want))
        (OUT / "snow" / "angles.json").write_text(json.dumps(angles, indent=1) + "\n")
    if "frost" in names:
        write_frost(imgs, corrupt)
    if "spatter" in names:
        write_spatter(imgs, corrupt)
    for name in STAT_IMAGES:
        img = imgs[name]
        for c, stat_names in LATER_RANDOM.items():
            if c not in names:
                continue
            stats[name][c] = random_stats(corrupt, img, c, stat_names)


def main() -> int:
    try:
        import imagecorruptions
        from imagecorruptions import corrupt
        from imagecorruptions.corruptions import _motion_blur, plasma_fractal, next_power_of_2
    except ImportError:
        print("corruption_fixtures.py needs imagecorruptions==1.1.2 (see the docstring)", file=sys.stderr)
        return 1
    if not (ASSETS / "mnist" / "t10k-images-idx3-ubyte").exists():
        print(f"{ASSETS} is incomplete; run tools/setup.sh first", file=sys.stderr)
        return 1
    import imagecorruptions.corruptions as icc
    patch_gaussian(icc)
    np.random.seed(SEED)
    later = LATER_DETERMINISTIC + tuple(LATER_RANDOM) + ("frost", "spatter")
    if "--later" in sys.argv[1:]:
        names = [a for a in sys.argv[1:] if a != "--later"] or list(later)
        doc = json.loads((OUT / "stats.json").read_text())
        write_later(inputs(), corrupt, doc["stats"], names)
        import importlib.metadata as md
        found = {}
        for p in ("imagecorruptions", "numpy", "scikit-image", "scipy", "pillow", "opencv-python",
                  "opencv-python-headless"):
            try:
                found[p] = md.version(p)
            except md.PackageNotFoundError:
                pass
        doc.setdefault("versions_later", {}).update(found)
        (OUT / "stats.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"[corruption_fixtures] added {', '.join(names)} to {OUT}")
        return 0
    for sub in ("inputs", "expected", "fog", "elastic", "snow", "frost", "spatter"):  # README.md is written by hand and stays
        shutil.rmtree(OUT / sub, ignore_errors=True)
    imgs = inputs()
    for name, img in imgs.items():
        save_png(OUT / "inputs" / f"{name}.png", img)

    for name, img in imgs.items():
        for c in DETERMINISTIC:
            for s in SEVERITIES:
                save_png(OUT / "expected" / name / f"{c}_{s}.png", corrupt(img, severity=s, corruption_name=c))
        for s in SEVERITIES:
            radius, sigma = MOTION_PARAMS[s - 1]
            assert_no_rounding_ties(radius, MOTION_ANGLES[name])
            blurred = _motion_blur(np.array(img), radius=radius, sigma=sigma, angle=MOTION_ANGLES[name])
            save_png(OUT / "expected" / name / f"motion_blur_{s}.png", np.uint8(np.clip(blurred, 0, 255)))

    # Fog given its map: the same arithmetic as imagecorruptions.corruptions.fog, with the map
    # kept. (fog draws the map with plasma_fractal(mapsize=next_power_of_2(max(shape))).)
    fog_params = [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)]
    img = imgs["photo32"]
    for s in FOG_SEVERITIES:
        c = fog_params[s - 1]
        mapsize = next_power_of_2(int(max(img.shape)))
        fmap = plasma_fractal(mapsize=mapsize, wibbledecay=c[1])[:img.shape[0], :img.shape[1]]
        x = img / 255.
        max_val = x.max()
        x = x + c[0] * fmap[..., np.newaxis]
        out = np.uint8(np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255)
        (OUT / "fog").mkdir(parents=True, exist_ok=True)
        np.save(OUT / "fog" / f"photo32_s{s}_map.npy", fmap.astype(np.float64))
        save_png(OUT / "fog" / f"photo32_s{s}.png", out)

    stats: dict = {}
    for name in STAT_IMAGES:
        img = imgs[name]
        stats[name] = {}
        for c, names in RANDOM.items():
            stats[name][c] = random_stats(corrupt, img, c, names)
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("imagecorruptions", "numpy", "opencv-python", "scikit-image", "scipy",
                                           "pillow")}
    write_later(imgs, corrupt, stats, later)
    doc = {"seed": SEED, "draws": DRAWS, "motion_angles": MOTION_ANGLES, "versions": versions, "stats": stats}
    (OUT / "stats.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"[corruption_fixtures] wrote {OUT} ({total / 1024:.0f} KiB) with imagecorruptions "
          f"{versions['imagecorruptions']} from {Path(imagecorruptions.__file__).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
