//! ImageNet-C's `frost` as `imagecorruptions` 1.1.2 makes it: one of the package's first five
//! frost photographs, scaled by OpenCV's `resize(INTER_CUBIC)` to 1.1 times the size that covers
//! the image (the photograph's own size when it already does), a random crop of the image's size
//! out of it, and `clip(c₀·x + c₁·frost, 0, 255)` in float64.
//!
//! The photographs come with the package (`tools/setup.sh` decodes them into `assets/frost/`,
//! binary PPM; Pillow decodes the two JPEGs as OpenCV's `imread` does, both libjpeg-turbo with its
//! defaults). [`resize_cubic`] is OpenCV's 8-bit bicubic resize operation for operation: the
//! coefficients of its cubic convolution (a = −0.75) computed in float32 at the source coordinate
//! `(d + 0.5)·(src/dst) − 0.5`, rounded to 11 fractional bits; the horizontal pass in integers
//! with the edge pixel repeated; the vertical pass in integers with 22 fractional bits, except
//! that OpenCV's vectorised loop (8 values at a time, SSE width) converts to float32 and sums
//! `S₀b₀ + (S₁b₁ + (S₂b₂ + S₃b₃))`, each product and sum rounded, then rounds to nearest even.
//!
//! That is what OpenCV computes without Intel IPP (ARM phones and laptops, builds without IPP).
//! OpenCV's x86 wheels resize through IPP by default, whose cubic kernel rounds nearly as exact
//! arithmetic does: 3–5 % of the rescaled photographs' values come out one level apart, so the
//! package's frost on such a machine differs from this one by one level on a few percent of the
//! values (`tests/fixtures/corrupt/frost/`, both kept and tested).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::{CorruptError, RgbImage};

/// (weight of the image, weight of the frost) per severity.
pub const FROST: [(f64, f64); 5] = [(1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)];

/// How many photographs the package draws among (`np.random.randint(5)`: its sixth is unused).
pub const TEXTURES: usize = 5;

/// The photographs as `tools/setup.sh` writes them, relative to the assets folder.
pub fn texture_file(index: usize) -> String {
    format!("frost/frost{}.ppm", index + 1)
}

/// The frost photographs, with their rescaled versions cached by size.
#[derive(Debug)]
pub struct FrostTextures {
    images: Vec<RgbImage>,
    rescaled: Mutex<HashMap<(usize, usize, usize), Arc<RgbImage>>>,
}

impl FrostTextures {
    /// The photographs, in the package's order.
    pub fn new(images: Vec<RgbImage>) -> Result<FrostTextures, CorruptError> {
        if images.len() != TEXTURES {
            return Err(CorruptError::FrostTextures {
                reason: format!("{} textures given, the package draws among {TEXTURES}", images.len()),
            });
        }
        Ok(FrostTextures { images, rescaled: Mutex::new(HashMap::new()) })
    }

    /// Reads `frost/frost1.ppm` … `frost5.ppm` under `assets`.
    pub fn load(assets: &Path) -> Result<FrostTextures, CorruptError> {
        let images = (0..TEXTURES).map(|i| read_ppm(&assets.join(texture_file(i)))).collect::<Result<Vec<_>, _>>()?;
        FrostTextures::new(images)
    }

    /// Photograph `index` as the package reads it.
    pub fn image(&self, index: usize) -> &RgbImage {
        &self.images[index]
    }

    /// Photograph `index` rescaled for an image of `height × width` (the package's scaling:
    /// [`rescaled_size`]).
    pub fn rescaled(&self, index: usize, height: usize, width: usize) -> Arc<RgbImage> {
        let texture = &self.images[index];
        let (rh, rw) = rescaled_size((texture.h(), texture.w()), (height, width));
        let mut cache = self.rescaled.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry((index, rh, rw)).or_insert_with(|| Arc::new(resize_cubic(texture, rw, rh))).clone()
    }
}

/// The textures of the assets folder `tools/setup.sh` built (found as the demo finds its
/// assets), read once per process.
pub fn textures() -> Result<Arc<FrostTextures>, CorruptError> {
    static TEXTURES_ONCE: OnceLock<Result<Arc<FrostTextures>, CorruptError>> = OnceLock::new();
    TEXTURES_ONCE
        .get_or_init(|| {
            let marker = texture_file(0);
            let dir: PathBuf = crate::assets::find_with(None, &marker).ok_or_else(|| CorruptError::FrostTextures {
                reason: format!(
                    "no assets folder with {marker} (looked in ACCLIMATE_ASSETS, next to the binary and in ./assets): \
                     run `bash tools/setup.sh`"
                ),
            })?;
            FrostTextures::load(&dir).map(Arc::new)
        })
        .clone()
}

/// The size (height, width) the package rescales a `texture` photograph to for an image of
/// `image` (height, width): a factor that makes it cover the image (1 when it does; else the
/// larger of the two ratios), times 1.1, each side `ceil(side · factor)`.
pub fn rescaled_size(texture: (usize, usize), image: (usize, usize)) -> (usize, usize) {
    let (th, tw) = texture;
    let (ih, iw) = image;
    let factor = match (th >= ih, tw >= iw) {
        (true, true) => 1.0,
        (false, true) => ih as f64 / th as f64,
        (true, false) => iw as f64 / tw as f64,
        (false, false) => (ih as f64 / th as f64).max(iw as f64 / tw as f64),
    } * 1.1;
    ((th as f64 * factor).ceil() as usize, (tw as f64 * factor).ceil() as usize)
}

/// `frost` with its draws given: photograph `index` (0..5), rescaled for the image, cropped at
/// row `top` and column `left` (the package's `x_start`, `y_start`, each drawn below the
/// rescaled side minus the image's).
pub fn frost_with_draws(
    img: &RgbImage,
    severity: u8,
    textures: &FrostTextures,
    index: usize,
    top: usize,
    left: usize,
) -> Result<RgbImage, CorruptError> {
    let s = super::check(img, super::Corruption::Frost, severity)?;
    if index >= TEXTURES {
        return Err(CorruptError::FrostTextures { reason: format!("texture {index} of {TEXTURES}") });
    }
    let rescaled = textures.rescaled(index, img.h(), img.w());
    if top + img.h() > rescaled.h() || left + img.w() > rescaled.w() {
        return Err(CorruptError::FrostTextures {
            reason: format!(
                "a {}x{} crop at row {top}, column {left} leaves the {}x{} rescaled texture",
                img.w(),
                img.h(),
                rescaled.w(),
                rescaled.h()
            ),
        });
    }
    Ok(blend(img, s, &rescaled, top, left))
}

/// `frost` drawing the photograph and the crop from `rng` (uniformly, as the package's
/// `randint` calls: the photograph, then the row, then the column).
pub fn frost<R: rand::Rng + ?Sized>(img: &RgbImage, s: usize, rng: &mut R) -> Result<RgbImage, CorruptError> {
    use rand::RngExt;
    let textures = textures()?;
    let index = rng.random_range(0..TEXTURES);
    let rescaled = textures.rescaled(index, img.h(), img.w());
    // The rescaled side is at least 1.1 times the image's: each range holds at least one offset.
    let top = rng.random_range(0..rescaled.h() - img.h());
    let left = rng.random_range(0..rescaled.w() - img.w());
    Ok(blend(img, s, &rescaled, top, left))
}

/// `np.clip(c₀·x + c₁·frost, 0, 255)` in float64, then `corrupt()`'s `np.uint8` (a truncation).
fn blend(img: &RgbImage, s: usize, rescaled: &RgbImage, top: usize, left: usize) -> RgbImage {
    let (a, b) = FROST[s];
    let (w, rw) = (img.w(), rescaled.w());
    let mut out = Vec::with_capacity(img.data.len());
    for y in 0..img.h() {
        let row = &img.data[y * w * 3..(y + 1) * w * 3];
        let frost = &rescaled.data[((top + y) * rw + left) * 3..((top + y) * rw + left + w) * 3];
        for (&x, &f) in row.iter().zip(frost) {
            out.push((a * f64::from(x) + b * f64::from(f)).clamp(0.0, 255.0) as u8);
        }
    }
    img.with_data(out)
}

/// Reads an 8-bit RGB binary PPM (P6) as `tools/fetch_assets.py` writes it (the `image` crate's
/// PNM decoder); any other image is refused.
pub fn read_ppm(path: &Path) -> Result<RgbImage, CorruptError> {
    let bad = |reason: String| CorruptError::FrostTextures { reason: format!("{}: {reason}", path.display()) };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("{e} (run `bash tools/setup.sh`)")))?;
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Pnm).map_err(|e| bad(e.to_string()))?;
    match img {
        image::DynamicImage::ImageRgb8(rgb) => Ok(RgbImage::from(rgb)),
        other => Err(bad(format!("not an 8-bit RGB PPM ({:?})", other.color()))),
    }
}

/// OpenCV's cubic convolution weights (a = −0.75) at fraction `x`, in float32 as `interpolateCubic`.
fn cubic_weights(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// The first source index and the four fixed-point weights (11 fractional bits) of output `d`
/// for a scale `src / dst` (OpenCV: `1 / (dst / src)` in float64, the coordinate cast to
/// float32, `cvFloor`, the weights `saturate_cast<short>(w · 2048)`).
fn taps(d: usize, scale: f64) -> (isize, [i32; 4]) {
    let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
    let s = f.floor();
    let w = cubic_weights(f - s);
    (s as isize - 1, w.map(|v| ((v * 2048.0).round_ties_even() as i32).clamp(i16::MIN.into(), i16::MAX.into())))
}

/// OpenCV's `resize(src, (width, height), interpolation=INTER_CUBIC)` of an 8-bit RGB image.
pub fn resize_cubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    const CN: usize = 3;
    let (sw, sh) = (img.w(), img.h());
    let scale_x = 1.0 / (width as f64 / sw as f64);
    let scale_y = 1.0 / (height as f64 / sh as f64);
    let clampi = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let xt: Vec<(isize, [i32; 4])> = (0..width).map(|d| taps(d, scale_x)).collect();
    // The horizontal pass of every source row (OpenCV computes those its output rows need).
    let horizontal: Vec<Vec<i32>> = (0..sh)
        .map(|y| {
            let row = &img.data[y * sw * CN..(y + 1) * sw * CN];
            let mut out = Vec::with_capacity(width * CN);
            for (sx, a) in &xt {
                for k in 0..CN {
                    out.push((0..4).map(|j| i32::from(row[clampi(sx + j as isize, sw) * CN + k]) * a[j]).sum());
                }
            }
            out
        })
        .collect();
    let n = width * CN;
    // OpenCV's vector loop takes 8 values at a time (`v_int16` lanes at 128 bits); the rest is scalar.
    let vector_end = n / 8 * 8;
    let mut data = Vec::with_capacity(height * n);
    for dy in 0..height {
        let (sy, b) = taps(dy, scale_y);
        let rows: [&Vec<i32>; 4] = std::array::from_fn(|k| &horizontal[clampi(sy + k as isize, sh)]);
        let bf = b.map(|v| v as f32 * (1.0 / (2048.0 * 2048.0)));
        for x in 0..n {
            let s = rows.map(|r| r[x]);
            let v = if x < vector_end {
                let t = (s[3] as f32) * bf[3];
                let t = (s[2] as f32) * bf[2] + t;
                let t = (s[1] as f32) * bf[1] + t;
                let t = (s[0] as f32) * bf[0] + t;
                // v_round, then v_pack (saturating to 16 bits) and v_pack_u (to 8).
                (t.round_ties_even() as i64).clamp(i16::MIN.into(), i16::MAX.into())
            } else {
                let sum: i64 = (0..4).map(|k| i64::from(s[k]) * i64::from(b[k])).sum();
                (sum + (1 << 21)) >> 22
            };
            data.push(v.clamp(0, 255) as u8);
        }
    }
    RgbImage { width: width as u32, height: height as u32, data }
}
