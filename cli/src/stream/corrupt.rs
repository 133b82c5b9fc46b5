//! ImageNet-C corruptions applied on the fly to RGB8 frames, seeded, plus `low_light`.
//!
//! The fifteen ImageNet-C corruptions and the package's four extras
//! (gaussian_blur, speckle_noise, saturate, spatter) follow the `imagecorruptions` package (v1.1.2, the
//! ImageNet-C code generalised to any image size; Michaelis et al. 2019): the same severity
//! tables, the same arithmetic in float64 on `pixel / 255` (float32 where the package casts), and
//! the same final cast of `corrupt()` (`np.uint8(x)`, a truncation, not a rounding). Where the
//! package calls a library, this module reimplements the library's algorithm:
//! - `brightness`: scikit-image's `rgb2hsv`/`hsv2rgb` round trip, operation for operation;
//! - `defocus_blur`: the float32 disk kernel anti-aliased by OpenCV's `GaussianBlur` (separable,
//!   reflect-101 borders, the vectorised path's fused multiply-adds), then `filter2D` in float64
//!   with reflect-101 borders;
//! - `pixelate`: Pillow's `resize(BOX)` (fixed-point coefficients with 22 fractional bits, a
//!   horizontal then a vertical pass, each rounded to 8 bits) and `resize(NEAREST)` (Pillow's
//!   incremental source coordinates);
//! - `jpeg_compression`: Pillow's JPEG save and load, i.e. libjpeg(-turbo) with its defaults:
//!   4:2:0 chroma subsampling, the IJG tables scaled by the quality and clamped to 8 bits, the
//!   integer ("islow") forward and inverse DCT, "fancy" (triangle-filter) chroma upsampling and
//!   the fixed-point colour conversions. The lossy path is simulated without the entropy coding,
//!   which is lossless; a plain encoder (the `image` crate's is 4:4:4) lands about 25 dB PSNR
//!   away from the package's output, as far as the corruption itself;
//! - `motion_blur`: the package's own numpy motion blur (not ImageNet-C's ImageMagick one): a
//!   one-sided Gaussian of width `2·radius + 1` along a random angle in [-45°, 45°], shifts with
//!   edge replication, and the package's early stop when a shift leaves the image (the remaining
//!   weights are dropped, not renormalised, which darkens small images at high severity);
//! - `zoom_blur`: scipy's `zoom` with linear interpolation (output index o at input coordinate
//!   o·(n_in − 1)/(n_out − 1), the four taps summed in float64, rounded to float32), the layers
//!   summed in float32 as the package sums them;
//! - `glass_blur`, `gaussian_blur`, `elastic_transform`: scikit-image's `gaussian`, i.e. scipy's
//!   separable `gaussian_filter` (kernel radius ⌊truncate·σ + 0.5⌋, symmetric taps summed
//!   pairwise from the outermost in); `elastic_transform`'s warp is scipy's linear
//!   `map_coordinates` with half-sample-symmetric (`reflect`) edges;
//! - `saturate`: the same HSV round trip as `brightness`;
//! - `snow`: the flakes zoomed as `zoom_blur` zooms, streaked as `motion_blur` streaks, and
//!   OpenCV's float32 RGB→gray for the brightened image;
//! - `frost`: the package's frost photographs (`assets/frost/`, from its wheel), OpenCV's 8-bit
//!   `resize(INTER_CUBIC)` (module [`frost`]) and a random crop;
//! - `spatter`: scikit-image's `gaussian` for its liquid layer, then OpenCV's `Canny`,
//!   `distanceTransform`, box `blur`, `equalizeHist` and `filter2D` (module [`spatter`]);
//! - `fog`: the package's diamond-square plasma fractal on a map of side
//!   `next_power_of_two(max(height, width, 3))` (32 for a 32×32 frame, 256 for 176×144), so the
//!   fog's spatial scale follows the image, as in the package.
//!
//! Sizes follow the package for the image at hand (the disk kernel of `defocus_blur` is 17×17 up
//! to radius 8, the pixelate factors apply to the frame's own size). Images must be at least
//! 32×32, as `imagecorruptions.corrupt` requires.
//!
//! `low_light` is not an ImageNet-C corruption. It models an under-exposed camera frame in linear
//! light: the sRGB pixel is linearised (IEC 61966-2-1), scaled by the exposure factor of the
//! severity (2 to 6 stops: 1/4, 1/8, 1/16, 1/32, 1/64), turned into a photo-electron count of a
//! small-pixel phone sensor that collects [`LOW_LIGHT_FULL_SCALE_E`] electrons at linear 1.0 with
//! the normal exposure (Poisson shot noise), read out with Gaussian read noise of
//! [`LOW_LIGHT_READ_NOISE_E`] electrons, divided back by the full scale, clipped to [0, 1],
//! re-encoded to sRGB and rounded to 8 bits. No gain is applied: the frame is darker and noisier,
//! with fewer distinct levels, as a camera that cannot raise its exposure delivers it. Each
//! channel gets its own noise (the Bayer mosaic's correlations are not modelled).
//!
//! Randomness comes from the caller's generator only, so a frame seeded from (seed, frame index)
//! (see `schedule::frame_rng`) is corrupted identically whatever the threading.

use std::fmt;
use std::str::FromStr;

use rand::{Rng, RngExt};
use rand_distr::{Distribution, Poisson, StandardNormal};
use thiserror::Error;

pub mod frost;
pub mod spatter;
pub use frost::{FrostTextures, frost_with_draws, resize_cubic};
pub use spatter::spatter_with_draws;

/// Why a corruption could not be applied or named.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum CorruptError {
    /// A name that is no corruption.
    #[error("unknown corruption `{name}`; valid names: {valid}")]
    UnknownCorruption { name: String, valid: String },
    /// A severity outside 1..=5.
    #[error("severity {severity} of {corruption} is outside 1..=5")]
    Severity { corruption: &'static str, severity: u8 },
    /// An image smaller than the 32×32 the severity tables are made for.
    #[error("the image is {width}x{height}; corruptions need at least 32x32 (as imagecorruptions)")]
    ImageTooSmall { width: u32, height: u32 },
    /// `frost`'s photographs could not be read (they come from `tools/setup.sh`), or its draws
    /// do not fit them.
    #[error("frost: {reason}")]
    FrostTextures { reason: String },
    /// A pixel buffer whose length does not match its size.
    #[error("an RGB8 image of {width}x{height} needs {expected} bytes, the buffer has {len}")]
    BufferSize { width: u32, height: u32, expected: u128, len: usize },
}

/// An owned RGB8 image: `width × height` pixels, row-major, interleaved R, G, B.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (`width·height·3` bytes, row-major, interleaved RGB).
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<RgbImage, CorruptError> {
        let expected = u128::from(width) * u128::from(height) * 3;
        if expected != data.len() as u128 {
            return Err(CorruptError::BufferSize { width, height, expected, len: data.len() });
        }
        Ok(RgbImage { width, height, data })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The interleaved RGB bytes.
    pub fn as_raw(&self) -> &[u8] {
        &self.data
    }

    /// The interleaved RGB bytes, moved out.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    fn w(&self) -> usize {
        self.width as usize
    }

    fn h(&self) -> usize {
        self.height as usize
    }

    /// A new image of the same size from a buffer built to that size.
    fn with_data(&self, data: Vec<u8>) -> RgbImage {
        debug_assert_eq!(data.len(), self.data.len());
        RgbImage { width: self.width, height: self.height, data }
    }
}

impl From<image::RgbImage> for RgbImage {
    fn from(img: image::RgbImage) -> RgbImage {
        let (width, height) = img.dimensions();
        RgbImage { width, height, data: img.into_raw() }
    }
}

/// The corruptions. Names (for [`FromStr`] and [`Corruption::name`]) are those of
/// `imagecorruptions`, plus `low_light`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// Additive Gaussian noise, σ = 0.08 … 0.38 (of full scale).
    GaussianNoise,
    /// Poisson noise with 60 … 3 photons at full scale.
    ShotNoise,
    /// Salt-and-pepper noise on 3 % … 27 % of the values (each channel on its own).
    ImpulseNoise,
    /// Convolution with an anti-aliased disk of radius 3 … 10 pixels.
    DefocusBlur,
    /// A one-sided Gaussian streak along a random angle, radius 10 … 20, σ 3 … 15.
    MotionBlur,
    /// A plasma-fractal haze added and the contrast compressed.
    Fog,
    /// +0.1 … +0.5 on the HSV value.
    Brightness,
    /// Deviation from the per-channel mean scaled by 0.4 … 0.05.
    Contrast,
    /// Box down-sampling by 0.6 … 0.25 and nearest up-sampling.
    Pixelate,
    /// A JPEG round trip at quality 25 … 7.
    JpegCompression,
    /// An under-exposed sensor frame: 2 … 6 stops darker, shot and read noise (not ImageNet-C).
    LowLight,
    /// The image averaged with its centre zoomed by 1 … 1.3 (11 to 16 zoom factors).
    ZoomBlur,
    /// Gaussian blur σ 0.7 … 1.5, pixels moved by up to 1 … 4 pixels, blurred again.
    GlassBlur,
    /// A smooth random displacement field of up to about 0.5 % of the height, scaled by 12.5 … 30.
    ElasticTransform,
    /// Zoomed Gaussian flakes streaked along a random angle, over a brightened image.
    Snow,
    /// Gaussian blur σ 1 … 6 (one of the package's four extra corruptions).
    GaussianBlur,
    /// One of the package's frost photographs, rescaled and cropped, blended in with weight
    /// 0.4 … 0.75 while the image keeps 1 … 0.6.
    Frost,
    /// Multiplicative Gaussian noise, σ 0.15 … 0.6 (extra).
    SpeckleNoise,
    /// HSV saturation scaled by 0.3, 0.1, 2, 5 and 20 (plus 0.1 and 0.2 at the last two; extra).
    Saturate,
    /// Water drops (severities 1–3: a turquoise layer embossed along the edges of a smoothed
    /// random field, OpenCV's Canny and distance transform) or mud (4–5: brown blots) (extra).
    Spatter,
}

impl Corruption {
    /// Every corruption: the first ten in the order of `imagecorruptions`' list, `low_light`, then
    /// those added later (the other ImageNet-C ones, then the package's four extras).
    pub const ALL: [Corruption; 20] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::DefocusBlur,
        Corruption::MotionBlur,
        Corruption::Fog,
        Corruption::Brightness,
        Corruption::Contrast,
        Corruption::Pixelate,
        Corruption::JpegCompression,
        Corruption::LowLight,
        Corruption::ZoomBlur,
        Corruption::GlassBlur,
        Corruption::ElasticTransform,
        Corruption::Snow,
        Corruption::Frost,
        Corruption::GaussianBlur,
        Corruption::SpeckleNoise,
        Corruption::Saturate,
        Corruption::Spatter,
    ];

    /// The name, as `imagecorruptions` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::MotionBlur => "motion_blur",
            Corruption::Fog => "fog",
            Corruption::Brightness => "brightness",
            Corruption::Contrast => "contrast",
            Corruption::Pixelate => "pixelate",
            Corruption::JpegCompression => "jpeg_compression",
            Corruption::LowLight => "low_light",
            Corruption::ZoomBlur => "zoom_blur",
            Corruption::GlassBlur => "glass_blur",
            Corruption::ElasticTransform => "elastic_transform",
            Corruption::Snow => "snow",
            Corruption::Frost => "frost",
            Corruption::GaussianBlur => "gaussian_blur",
            Corruption::SpeckleNoise => "speckle_noise",
            Corruption::Saturate => "saturate",
            Corruption::Spatter => "spatter",
        }
    }

    /// Whether the result depends on the random generator.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Corruption::GaussianNoise
                | Corruption::ShotNoise
                | Corruption::ImpulseNoise
                | Corruption::MotionBlur
                | Corruption::Fog
                | Corruption::LowLight
                | Corruption::GlassBlur
                | Corruption::ElasticTransform
                | Corruption::Snow
                | Corruption::Frost
                | Corruption::SpeckleNoise
                | Corruption::Spatter
        )
    }

    /// The valid names, comma-separated (for error messages).
    pub fn valid_names() -> String {
        Corruption::ALL.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Corruption {
    type Err = CorruptError;

    /// Parses a name: case-insensitive, `-` or space accepted for `_` (`Gaussian-Noise`).
    fn from_str(s: &str) -> Result<Corruption, CorruptError> {
        let norm: String =
            s.trim().chars().map(|c| if c == '-' || c == ' ' { '_' } else { c.to_ascii_lowercase() }).collect();
        if let Some(c) = Corruption::ALL.iter().find(|c| c.name() == norm) {
            return Ok(*c);
        }
        Err(CorruptError::UnknownCorruption { name: s.trim().to_string(), valid: Corruption::valid_names() })
    }
}

// Severity tables of imagecorruptions 1.1.2 (index = severity - 1).
const GAUSSIAN_SIGMA: [f64; 5] = [0.08, 0.12, 0.18, 0.26, 0.38];
const SHOT_PHOTONS: [f64; 5] = [60.0, 25.0, 12.0, 5.0, 3.0];
const IMPULSE_AMOUNT: [f64; 5] = [0.03, 0.06, 0.09, 0.17, 0.27];
/// (disk radius, anti-aliasing σ)
const DEFOCUS: [(i32, f32); 5] = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)];
/// (radius, σ) of the streak
const MOTION: [(usize, u32); 5] = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)];
/// (fog strength, wibble decay of the plasma fractal)
const FOG: [(f64, f64); 5] = [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)];
const BRIGHTNESS: [f64; 5] = [0.1, 0.2, 0.3, 0.4, 0.5];
const CONTRAST: [f64; 5] = [0.4, 0.3, 0.2, 0.1, 0.05];
const PIXELATE: [f64; 5] = [0.6, 0.5, 0.4, 0.3, 0.25];
const JPEG_QUALITY: [u32; 5] = [25, 18, 15, 10, 7];
/// Exposure factor in linear light per severity: 2, 3, 4, 5 and 6 stops under.
pub const LOW_LIGHT_EXPOSURE: [f64; 5] = [1.0 / 4.0, 1.0 / 8.0, 1.0 / 16.0, 1.0 / 32.0, 1.0 / 64.0];
/// Photo-electrons collected at linear 1.0 with the normal exposure (a small phone-camera pixel
/// holds a few thousand).
pub const LOW_LIGHT_FULL_SCALE_E: f64 = 4000.0;
/// Read noise, electrons RMS (typical of current CMOS phone sensors).
pub const LOW_LIGHT_READ_NOISE_E: f64 = 3.0;
/// The smallest width and height a corruption accepts (imagecorruptions' limit).
pub const MIN_SIDE: u32 = 32;

/// Applies `corruption` at `severity` (1..=5) to `img`, drawing randomness from `rng`.
pub fn apply<R: Rng + ?Sized>(
    img: &RgbImage,
    corruption: Corruption,
    severity: u8,
    rng: &mut R,
) -> Result<RgbImage, CorruptError> {
    let s = check(img, corruption, severity)?;
    Ok(match corruption {
        Corruption::GaussianNoise => {
            let sigma = GAUSSIAN_SIGMA[s];
            map_values(img, |v| {
                let n: f64 = StandardNormal.sample(rng);
                unit_to_u8(unit(v) + sigma * n)
            })
        }
        Corruption::ShotNoise => {
            let c = SHOT_PHOTONS[s];
            map_values(img, |v| unit_to_u8(poisson(unit(v) * c, rng) / c))
        }
        Corruption::ImpulseNoise => {
            let p = IMPULSE_AMOUNT[s];
            // skimage's random_noise(mode="s&p"): each value flips with probability `amount`,
            // to 1 or 0 with equal odds (Bernoulli draws as `random() <= p`).
            map_values(img, |v| {
                let flipped = rng.random::<f64>() <= p;
                let salted = rng.random::<f64>() <= 0.5;
                let x = match (flipped, salted) {
                    (false, _) => unit(v),
                    (true, true) => 1.0,
                    (true, false) => 0.0,
                };
                unit_to_u8(x)
            })
        }
        Corruption::DefocusBlur => defocus_blur(img, s),
        Corruption::MotionBlur => {
            let angle = uniform(rng, -45.0, 45.0);
            motion_blur_inner(img, s, angle)
        }
        Corruption::Fog => {
            let (_, decay) = FOG[s];
            let side = fog_map_size(img);
            let map = plasma_fractal(side, decay, rng);
            // The map is square; the image takes its top-left corner.
            let cropped: Vec<f64> =
                (0..img.h()).flat_map(|y| map[y * side..y * side + img.w()].iter().copied()).collect();
            fog_inner(img, s, &cropped)
        }
        Corruption::Brightness => brightness(img, s),
        Corruption::Contrast => contrast(img, s),
        Corruption::Pixelate => pixelate(img, s),
        Corruption::JpegCompression => jpeg::round_trip(img, JPEG_QUALITY[s]),
        Corruption::LowLight => low_light(img, s, rng),
        Corruption::ZoomBlur => zoom_blur(img, s),
        Corruption::GlassBlur => glass_blur(img, s, rng),
        Corruption::ElasticTransform => elastic_transform(img, s, rng),
        Corruption::Snow => {
            let (mean, sd, ..) = SNOW[s];
            let draws = normal_plane(img, mean, sd, rng);
            let angle = uniform(rng, -135.0, -45.0);
            snow_inner(img, s, &draws, angle)
        }
        Corruption::Frost => frost::frost(img, s, rng)?,
        Corruption::GaussianBlur => gaussian_blur(img, s),
        Corruption::SpeckleNoise => {
            let c = SPECKLE[s];
            map_values(img, |v| {
                let n: f64 = StandardNormal.sample(rng);
                let x = unit(v);
                unit_to_u8(x + x * (c * n))
            })
        }
        Corruption::Saturate => saturate(img, s),
        Corruption::Spatter => spatter::spatter(img, s, rng),
    })
}

/// `motion_blur` with a given angle (degrees; `apply` draws it uniformly in [-45, 45]).
pub fn motion_blur_at(img: &RgbImage, severity: u8, angle_deg: f64) -> Result<RgbImage, CorruptError> {
    let s = check(img, Corruption::MotionBlur, severity)?;
    Ok(motion_blur_inner(img, s, angle_deg))
}

/// `fog` with a given plasma map: `map` holds `height × width` values in [0, 1], row-major (the
/// top-left corner of the square fractal `apply` draws).
pub fn fog_with_map(img: &RgbImage, severity: u8, map: &[f64]) -> Result<RgbImage, CorruptError> {
    let s = check(img, Corruption::Fog, severity)?;
    check_plane(img, map.len())?;
    Ok(fog_inner(img, s, map))
}

/// The side of the square plasma map `fog` draws for `img` (the package's
/// `next_power_of_2(max(shape))`, where the shape includes the 3 channels).
pub fn fog_map_size(img: &RgbImage) -> usize {
    img.w().max(img.h()).max(3).next_power_of_two()
}

/// Validates the image size and severity; returns the table index.
fn check(img: &RgbImage, corruption: Corruption, severity: u8) -> Result<usize, CorruptError> {
    if !(1..=5).contains(&severity) {
        return Err(CorruptError::Severity { corruption: corruption.name(), severity });
    }
    if img.width < MIN_SIDE || img.height < MIN_SIDE {
        return Err(CorruptError::ImageTooSmall { width: img.width, height: img.height });
    }
    Ok(usize::from(severity) - 1)
}

/// Validates the length of a per-pixel plane given for `img` (a fog map, snow's draws, an elastic
/// field): one value per pixel.
fn check_plane(img: &RgbImage, len: usize) -> Result<(), CorruptError> {
    let expected = img.w() as u128 * img.h() as u128;
    if len as u128 != expected {
        return Err(CorruptError::BufferSize { width: img.width, height: img.height, expected, len });
    }
    Ok(())
}

/// A byte as the package sees it: `np.array(x) / 255.`
fn unit(v: u8) -> f64 {
    f64::from(v) / 255.0
}

/// The package's `np.clip(x, 0, 1) * 255` followed by `corrupt()`'s `np.uint8`, a truncation.
fn unit_to_u8(x: f64) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0) as u8
}

/// numpy's `uniform(low, high)`: `low + (high - low) · random()`.
fn uniform<R: Rng + ?Sized>(rng: &mut R, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.random::<f64>()
}

/// numpy's `normal(loc=mean, scale=sd, size=(height, width))` for `img`: one draw per pixel,
/// row-major (snow's flakes, spatter's liquid layer).
fn normal_plane<R: Rng + ?Sized>(img: &RgbImage, mean: f64, sd: f64, rng: &mut R) -> Vec<f64> {
    (0..img.w() * img.h())
        .map(|_| {
            let n: f64 = StandardNormal.sample(rng);
            mean + sd * n
        })
        .collect()
}

/// A Poisson draw of mean `lambda` (0 for `lambda` = 0, as numpy).
fn poisson<R: Rng + ?Sized>(lambda: f64, rng: &mut R) -> f64 {
    // Poisson::new only fails for a non-positive or non-finite mean; the means here are pixel
    // values times a table constant, so that branch is the zero-mean case.
    match Poisson::new(lambda) {
        Ok(p) => p.sample(rng),
        Err(_) => 0.0,
    }
}

fn map_values(img: &RgbImage, mut f: impl FnMut(u8) -> u8) -> RgbImage {
    img.with_data(img.data.iter().map(|&v| f(v)).collect())
}

/// OpenCV's default border, BORDER_REFLECT_101 (`gfedcb|abcdefgh|gfedcba`), for any offset.
fn reflect101(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * n - 2 - i;
        } else {
            return i as usize;
        }
    }
}

/// The package's `disk(radius, alias_blur)`: a float32 disk normalised to sum 1 on a 17×17 grid
/// (radius ≤ 8) or a (2·radius+1)² grid, blurred by OpenCV's `GaussianBlur` with a 3×3 (5×5)
/// kernel. Returns the kernel (as float64, as `filter2D` uses it) and its side.
fn disk_kernel(radius: i32, alias_blur: f32) -> (Vec<f64>, usize) {
    let (half, ksize) = if radius <= 8 { (8i32, 3usize) } else { (radius, 5usize) };
    let n = (2 * half + 1) as usize;
    let mut disk: Vec<f32> = (0..n * n)
        .map(|i| {
            let (y, x) = ((i / n) as i32 - half, (i % n) as i32 - half);
            if x * x + y * y <= radius * radius { 1.0 } else { 0.0 }
        })
        .collect();
    let count = disk.iter().filter(|&&v| v != 0.0).count() as f32;
    for v in &mut disk {
        *v /= count;
    }
    // getGaussianKernel(ksize, sigma, CV_32F): weights in float64, normalised, stored as f32.
    let sigma = f64::from(alias_blur);
    let scale2 = -0.5 / (sigma * sigma);
    let t: Vec<f64> = (0..ksize)
        .map(|i| {
            let x = i as f64 - (ksize as f64 - 1.0) * 0.5;
            (scale2 * x * x).exp()
        })
        .collect();
    let sum: f64 = t.iter().sum();
    let g: Vec<f32> = t.iter().map(|v| (v / sum) as f32).collect();
    let r = ksize / 2;
    // OpenCV's vectorised symmetric row and column filters: the centre tap times its weight,
    // then each mirrored pair's sum with a fused multiply-add. (Its scalar tail, used for the
    // last columns of a row that are not a multiple of the vector width, rounds without fusing:
    // those kernel entries can differ from the package's by one float32 ulp.)
    let filt = |src: &[f32], w: usize, h: usize, horizontal: bool| -> Vec<f32> {
        let mut out = vec![0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                let at = |d: isize| -> f32 {
                    if horizontal {
                        src[y * w + reflect101(x as isize + d, w)]
                    } else {
                        src[reflect101(y as isize + d, h) * w + x]
                    }
                };
                let mut acc = g[r] * at(0);
                for j in 1..=r {
                    acc = g[r + j].mul_add(at(j as isize) + at(-(j as isize)), acc);
                }
                out[y * w + x] = acc;
            }
        }
        out
    };
    let rows = filt(&disk, n, n, true);
    let both = filt(&rows, n, n, false);
    (both.into_iter().map(f64::from).collect(), n)
}

fn defocus_blur(img: &RgbImage, s: usize) -> RgbImage {
    let (radius, alias) = DEFOCUS[s];
    let (kernel, n) = disk_kernel(radius, alias);
    let half = n / 2;
    let (w, h) = (img.w(), img.h());
    // filter2D's sum over the kernel, row-major. Zero taps are skipped (adding +0.0 to a
    // non-negative sum changes nothing), and each tap is applied to a whole output row, which
    // keeps every output's sequence of additions.
    let taps: Vec<(usize, usize, f64)> =
        kernel.iter().enumerate().filter(|(_, k)| **k != 0.0).map(|(i, k)| (i / n, i % n, *k)).collect();
    let (pw, ph) = (w + 2 * half, h + 2 * half);
    let mut out = vec![0u8; img.data.len()];
    let mut plane = vec![0.0f64; pw * ph];
    let mut acc = vec![0.0f64; w];
    for c in 0..3 {
        // The channel with a reflect-101 border of `half` pixels.
        for py in 0..ph {
            let sy = reflect101(py as isize - half as isize, h);
            for px in 0..pw {
                let sx = reflect101(px as isize - half as isize, w);
                plane[py * pw + px] = unit(img.data[(sy * w + sx) * 3 + c]);
            }
        }
        for y in 0..h {
            acc.fill(0.0);
            for &(ky, kx, k) in &taps {
                let row = &plane[(y + ky) * pw + kx..(y + ky) * pw + kx + w];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += k * v;
                }
            }
            for (x, a) in acc.iter().enumerate() {
                out[(y * w + x) * 3 + c] = unit_to_u8(*a);
            }
        }
    }
    img.with_data(out)
}

/// numpy's `np.sum` of a float64 vector: pairwise summation with 8 accumulators per block.
fn numpy_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, v| s + v)
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_sum(&a[..n2]) + numpy_sum(&a[n2..])
    }
}

fn motion_blur_inner(img: &RgbImage, s: usize, angle_deg: f64) -> RgbImage {
    let (radius, sigma) = MOTION[s];
    let src: Vec<f64> = img.data.iter().map(|&v| f64::from(v)).collect();
    let acc = motion_blur_f64(&src, img.h(), img.w(), 3, radius, sigma, angle_deg);
    img.with_data(acc.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect())
}

/// The package's `_motion_blur` of an `h × w × c` float64 image (row-major, interleaved): the
/// one-sided Gaussian kernel of width `2·radius + 1`, its taps' shifts along `angle_deg` with edge
/// replication, accumulated in float64, stopping when a shift leaves the image.
fn motion_blur_f64(src: &[f64], h: usize, w: usize, c: usize, radius: usize, sigma: u32, angle_deg: f64) -> Vec<f64> {
    let width = 2 * radius + 1;
    let sigma_f = f64::from(sigma);
    let two_sigma2 = f64::from(2 * sigma * sigma);
    let norm = (2.0 * std::f64::consts::PI).sqrt() * sigma_f;
    let k: Vec<f64> = (0..width).map(|i| (-((i * i) as f64) / two_sigma2).exp() / norm).collect();
    let z = numpy_sum(&k);
    let k: Vec<f64> = k.iter().map(|v| v / z).collect();
    let rad = angle_deg.to_radians();
    let p0 = width as f64 * rad.sin();
    let p1 = width as f64 * rad.cos();
    let hyp = p0.hypot(p1);
    let mut acc = vec![0.0f64; src.len()];
    for (i, ki) in k.iter().enumerate() {
        let dy = -((i as f64 * p0) / hyp - 0.5).ceil() as isize;
        let dx = -((i as f64 * p1) / hyp - 0.5).ceil() as isize;
        if dy.unsigned_abs() >= h || dx.unsigned_abs() >= w {
            // The streak left the image: the package stops here, without renormalising.
            break;
        }
        for y in 0..h {
            let sy = (y as isize - dy).clamp(0, h as isize - 1) as usize;
            for x in 0..w {
                let sx = (x as isize - dx).clamp(0, w as isize - 1) as usize;
                for ch in 0..c {
                    acc[(y * w + x) * c + ch] += ki * src[(sy * w + sx) * c + ch];
                }
            }
        }
    }
    acc
}

/// The package's `plasma_fractal`: a diamond-square height map of side `mapsize` (a power of
/// two) with toroidal neighbours, random offsets of ±wibble² (sic: the package multiplies a
/// uniform draw in [-wibble, wibble] by wibble again) starting at wibble = 100 and divided by
/// `decay` per level, normalised to [0, 1]. Row-major.
pub fn plasma_fractal<R: Rng + ?Sized>(mapsize: usize, decay: f64, rng: &mut R) -> Vec<f64> {
    let n = mapsize;
    let mut m = vec![0.0f64; n * n];
    let mut step = n;
    let mut wibble = 100.0f64;
    while step >= 2 {
        let k = n / step;
        let half = step / 2;
        let wib = |v: f64, rng: &mut R| v / 4.0 + wibble * uniform(rng, -wibble, wibble);
        // Squares: each centre from its four corners.
        let corner = |m: &Vec<f64>, a: usize, b: usize| m[(a % k) * step * n + (b % k) * step];
        let mut centres = vec![0.0; k * k];
        for a in 0..k {
            for b in 0..k {
                let s1 = corner(&m, a, b) + corner(&m, a + 1, b);
                let s2 = corner(&m, a, b + 1) + corner(&m, a + 1, b + 1);
                centres[a * k + b] = s1 + s2;
            }
        }
        for a in 0..k {
            for b in 0..k {
                m[(a * step + half) * n + b * step + half] = wib(centres[a * k + b], rng);
            }
        }
        // Diamonds: edge midpoints from the two adjacent centres and the two adjacent corners.
        let centre = |m: &Vec<f64>, a: usize, b: usize| m[((a % k) * step + half) * n + (b % k) * step + half];
        let mut top = vec![0.0; k * k];
        let mut left = vec![0.0; k * k];
        for a in 0..k {
            for b in 0..k {
                let dr = centre(&m, a, b);
                top[a * k + b] = (dr + centre(&m, a + k - 1, b)) + (corner(&m, a, b) + corner(&m, a, b + 1));
                left[a * k + b] = (dr + centre(&m, a, b + k - 1)) + (corner(&m, a, b) + corner(&m, a + 1, b));
            }
        }
        for a in 0..k {
            for b in 0..k {
                m[a * step * n + b * step + half] = wib(top[a * k + b], rng);
            }
        }
        for a in 0..k {
            for b in 0..k {
                m[(a * step + half) * n + b * step] = wib(left[a * k + b], rng);
            }
        }
        step /= 2;
        wibble /= decay;
    }
    let min = m.iter().copied().fold(f64::INFINITY, f64::min);
    for v in &mut m {
        *v -= min;
    }
    let max = m.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max > 0.0 {
        for v in &mut m {
            *v /= max;
        }
    }
    m
}

fn fog_inner(img: &RgbImage, s: usize, map: &[f64]) -> RgbImage {
    let (strength, _) = FOG[s];
    let max_val = img.data.iter().copied().max().map_or(0.0, unit);
    let out = img
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = unit(v) + strength * map[i / 3];
            unit_to_u8(x * max_val / (max_val + strength))
        })
        .collect();
    img.with_data(out)
}

/// scikit-image's rgb2hsv → (S, V) changed by `f` → hsv2rgb for one pixel, operation for
/// operation.
fn hsv_round_trip(rgb: [f64; 3], f: impl FnOnce(f64, f64) -> (f64, f64)) -> [f64; 3] {
    let [r, g, b] = rgb;
    let v = r.max(g).max(b);
    let delta = v - r.min(g).min(b);
    let s = if delta == 0.0 { 0.0 } else { delta / v };
    let h = if delta == 0.0 {
        0.0
    } else {
        // Later channels win ties, as in the package's successive masked assignments.
        let mut t = 0.0;
        if r == v {
            t = (g - b) / delta;
        }
        if g == v {
            t = 2.0 + (b - r) / delta;
        }
        if b == v {
            t = 4.0 + (r - g) / delta;
        }
        // numpy's float remainder: fmod, moved into [0, 1).
        let m = (t / 6.0) % 1.0;
        if m < 0.0 { m + 1.0 } else { m }
    };
    let (s, v) = f(s, v);
    let hi = (h * 6.0).floor();
    let f = h * 6.0 - hi;
    let p = v * (1.0 - s);
    let q = v * (1.0 - f * s);
    let t = v * (1.0 - (1.0 - f) * s);
    match (hi as u8) % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

fn brightness(img: &RgbImage, s: usize) -> RgbImage {
    let c = BRIGHTNESS[s];
    let mut out = Vec::with_capacity(img.data.len());
    for px in img.data.chunks_exact(3) {
        let rgb = hsv_round_trip([unit(px[0]), unit(px[1]), unit(px[2])], |s, v| (s, (v + c).clamp(0.0, 1.0)));
        out.extend(rgb.iter().map(|&v| unit_to_u8(v)));
    }
    img.with_data(out)
}

fn contrast(img: &RgbImage, s: usize) -> RgbImage {
    let c = CONTRAST[s];
    // np.mean(x, axis=(0, 1)) walks the pixels in order, one running sum per channel.
    let mut sums = [0.0f64; 3];
    for px in img.data.chunks_exact(3) {
        for ch in 0..3 {
            sums[ch] += unit(px[ch]);
        }
    }
    let count = (img.w() * img.h()) as f64;
    let means = sums.map(|s| s / count);
    let out =
        img.data.iter().enumerate().map(|(i, &v)| unit_to_u8((unit(v) - means[i % 3]) * c + means[i % 3])).collect();
    img.with_data(out)
}

/// Pillow's 8-bit resampling coefficients (`precompute_coeffs` + `normalize_coeffs_8bpc`) for
/// the box filter: per output sample, the first input index and the fixed-point weights.
fn pillow_box_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i64>)> {
    const PRECISION_BITS: u32 = 32 - 8 - 2;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 0.5 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = (x as f64 - center + 0.5) * ss;
                    if t > -0.5 && t <= 0.5 { 1.0 } else { 0.0 }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    (0.5 + v * f64::from(1u32 << PRECISION_BITS)) as i64
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

/// One Pillow 8-bit resampling pass along x (`horizontal`) or y of an interleaved RGB buffer.
fn pillow_pass(src: &[u8], w: usize, h: usize, coeffs: &[(usize, Vec<i64>)], horizontal: bool) -> Vec<u8> {
    let (ow, oh) = if horizontal { (coeffs.len(), h) } else { (w, coeffs.len()) };
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (start, k) = if horizontal { &coeffs[x] } else { &coeffs[y] };
            for c in 0..3 {
                let mut ss: i64 = 1 << 21;
                for (j, kj) in k.iter().enumerate() {
                    let (sx, sy) = if horizontal { (start + j, y) } else { (x, start + j) };
                    ss += i64::from(src[(sy * w + sx) * 3 + c]) * kj;
                }
                out[(y * ow + x) * 3 + c] = (ss >> 22).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Pillow's nearest-neighbour source indices for scaling `in_size` to `out_size`
/// (ImagingScaleAffine: the coordinate starts at half a step and accumulates the step).
fn pillow_nearest(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = (pos as usize).min(in_size - 1);
            pos += step;
            i
        })
        .collect()
}

fn pixelate(img: &RgbImage, s: usize) -> RgbImage {
    let c = PIXELATE[s];
    let (w, h) = (img.w(), img.h());
    // int(width * c) on the float product, as the package computes the size.
    let (sw, sh) = (((w as f64) * c) as usize, ((h as f64) * c) as usize);
    let small = pillow_pass(&img.data, w, h, &pillow_box_coeffs(w, sw), true);
    let small = pillow_pass(&small, sw, h, &pillow_box_coeffs(h, sh), false);
    let xs = pillow_nearest(sw, w);
    let ys = pillow_nearest(sh, h);
    let mut out = vec![0u8; img.data.len()];
    for (y, &sy) in ys.iter().enumerate() {
        for (x, &sx) in xs.iter().enumerate() {
            let src = (sy * sw + sx) * 3;
            out[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&small[src..src + 3]);
        }
    }
    img.with_data(out)
}

// ---------------------------------------------------------------------------------------------
// scipy.ndimage's Gaussian filter and linear interpolation, as the package reaches them through
// scikit-image's `gaussian` and scipy's `zoom` and `map_coordinates`.

/// How a filter or an interpolation extends an image beyond its edges (scipy.ndimage's modes).
#[derive(Clone, Copy)]
enum Edge {
    /// `nearest`: the edge value repeats (`aaaa|abcd|dddd`).
    Nearest,
    /// `reflect`: half-sample symmetric (`dcba|abcd|dcba`).
    Reflect,
}

impl Edge {
    fn index(self, i: isize, n: usize) -> usize {
        let n = n as isize;
        match self {
            Edge::Nearest => i.clamp(0, n - 1) as usize,
            Edge::Reflect => {
                let period = 2 * n;
                let m = i.rem_euclid(period);
                (if m < n { m } else { period - 1 - m }) as usize
            }
        }
    }
}

/// scipy's `_gaussian_kernel1d` (order 0): exp(−x²/(2σ²)) for x in −r..=r, r =
/// ⌊truncate·σ + 0.5⌋, divided by its numpy sum.
fn gaussian_kernel(sigma: f64, truncate: f64) -> Vec<f64> {
    let r = (truncate * sigma + 0.5) as i64;
    let k = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-r..=r).map(|x| (k * (x * x) as f64).exp()).collect();
    let sum = numpy_sum(&phi);
    phi.iter().map(|v| v / sum).collect()
}

/// scipy's `gaussian_filter` on a float64 image of `h × w` pixels with `c` interleaved channels
/// (the channel axis unfiltered, as scikit-image's `gaussian` with a channel axis): rows first,
/// then columns, each `correlate1d` with its symmetric kernel summed as scipy sums one — the
/// centre tap, then the pairs from the outermost in, `(left + right)·w`.
fn gaussian_filter(
    data: &[f64],
    h: usize,
    w: usize,
    c: usize,
    sigma: (f64, f64),
    truncate: f64,
    edge: Edge,
) -> Vec<f64> {
    let mut cur = data.to_vec();
    // (axis length, stride, sigma): axis 0 is the rows (y), axis 1 the columns (x).
    for (columns, len, stride, s) in [(false, h, w * c, sigma.0), (true, w, c, sigma.1)] {
        if s <= 1e-15 {
            continue;
        }
        let wts = gaussian_kernel(s, truncate);
        let r = wts.len() / 2;
        let mut next = vec![0.0; cur.len()];
        let lines = cur.len() / len;
        for l in 0..lines {
            // The line's start: every (row, channel) for columns, every (column, channel) for rows.
            let base = if columns { (l / c) * w * c + l % c } else { l };
            let at = |i: isize| cur[base + Edge::index(edge, i, len) * stride];
            for i in 0..len {
                let ii = i as isize;
                let mut t = at(ii) * wts[r];
                for j in (1..=r as isize).rev() {
                    t += (at(ii - j) + at(ii + j)) * wts[r - j as usize];
                }
                next[base + i * stride] = t;
            }
        }
        cur = next;
    }
    cur
}

/// numpy's `arange(start, stop, step)` for floats: ⌈(stop − start)/step⌉ values, the i-th
/// `start + i·((start + step) − start)` from the third on.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..n).map(|i| if i == 1 { start + step } else { start + i as f64 * delta }).collect()
}

/// (stop, step) of the zoom factors `arange(1, stop, step)` per severity.
const ZOOM: [(f64, f64); 5] = [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)];

/// The package's `zoom_blur`: the float32 image averaged with its centre crops zoomed back up
/// (`clipped_zoom`: the centre ⌈side/z⌉ cropped, scipy's `zoom` by (z, z, 1) with linear
/// interpolation, the top-left `h × w` kept) for every zoom factor z of the severity, summed in
/// float32 in that order and divided by their number plus one. scipy's zoom maps output index
/// o to input coordinate o·(n_in − 1)/(n_out − 1) (n_out = round(n_in·z), half to even) and sums
/// the four taps in float64, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1), each
/// `value·w_y·w_x`, before rounding to float32; a tap past the crop weighs 0.
/// scipy's `zoom(a, (z, z, 1), order=1)` of an `h × w × c` float64 image (row-major,
/// interleaved): the output is round(h·z) × round(w·z) (half to even), output index o maps to
/// input coordinate o·(n_in − 1)/(n_out − 1), and the four taps are summed in float64 in the order
/// (y0, x0), (y0, x1), (y1, x0), (y1, x1), each `value·w_y·w_x`; a tap past the edge weighs 0.
/// Returns the output and its height and width.
fn zoom_linear(a: &[f64], h: usize, w: usize, c: usize, z: f64) -> (Vec<f64>, usize, usize) {
    let (oh, ow) = ((h as f64 * z).round_ties_even() as usize, (w as f64 * z).round_ties_even() as usize);
    let ratio = |n_in: usize, n_out: usize| if n_out > 1 { (n_in - 1) as f64 / (n_out - 1) as f64 } else { 1.0 };
    let (ry, rx) = (ratio(h, oh), ratio(w, ow));
    let tap = |y: usize, x: usize, k: usize| if y < h && x < w { a[(y * w + x) * c + k] } else { 0.0 };
    let mut out = vec![0.0f64; oh * ow * c];
    for oy in 0..oh {
        let cy = oy as f64 * ry;
        let y0 = cy.floor();
        let ty = cy - y0;
        let y0 = y0 as usize;
        for ox in 0..ow {
            let cx = ox as f64 * rx;
            let x0 = cx.floor();
            let tx = cx - x0;
            let x0 = x0 as usize;
            for k in 0..c {
                let mut v = tap(y0, x0, k) * (1.0 - ty) * (1.0 - tx);
                v += tap(y0, x0 + 1, k) * (1.0 - ty) * tx;
                v += tap(y0 + 1, x0, k) * ty * (1.0 - tx);
                v += tap(y0 + 1, x0 + 1, k) * ty * tx;
                out[(oy * ow + ox) * c + k] = v;
            }
        }
    }
    (out, oh, ow)
}

/// The package's `clipped_zoom`: the centre ⌈side/z⌉ of each side cropped and zoomed by z
/// ([`zoom_linear`]), not cut back to the image's size.
fn clipped_zoom(a: &[f64], h: usize, w: usize, c: usize, z: f64) -> (Vec<f64>, usize, usize) {
    let ch0 = (h as f64 / z).ceil() as usize;
    let ch1 = (w as f64 / z).ceil() as usize;
    let (top0, top1) = ((h - ch0) / 2, (w - ch1) / 2);
    let crop: Vec<f64> = (0..ch0)
        .flat_map(|y| a[((top0 + y) * w + top1) * c..((top0 + y) * w + top1 + ch1) * c].iter().copied())
        .collect();
    zoom_linear(&crop, ch0, ch1, c, z)
}

fn zoom_blur(img: &RgbImage, s: usize) -> RgbImage {
    let (h, w) = (img.h(), img.w());
    let x: Vec<f32> = img.data.iter().map(|&v| unit(v) as f32).collect();
    let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let mut out = vec![0.0f32; x.len()];
    let factors = numpy_arange(1.0, ZOOM[s].0, ZOOM[s].1);
    for &z in &factors {
        // scipy's zoom of a float32 array computes in float64 and rounds its output to float32.
        let (layer, _, ow) = clipped_zoom(&x64, h, w, 3, z);
        for y in 0..h {
            for xx in 0..w {
                for k in 0..3 {
                    out[(y * w + xx) * 3 + k] += layer[(y * ow + xx) * 3 + k] as f32;
                }
            }
        }
    }
    let n = (factors.len() + 1) as f32;
    img.with_data(x.iter().zip(&out).map(|(&a, &b)| (((a + b) / n).clamp(0.0, 1.0) * 255.0) as u8).collect())
}

/// (σ, max displacement, iterations) of `glass_blur`.
const GLASS: [(f64, isize, usize); 5] = [(0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)];

/// The package's `glass_blur`: a Gaussian blur (scikit-image's `gaussian`, `nearest` edges,
/// truncated at 4σ) cast to 8 bits, pixels moved locally — for h from `height − d` down to
/// `d + 1`, w likewise, (dx, dy) drawn in [−d, d) and the pixel at (h + dy, w + dx) copied onto
/// (h, w) — and the Gaussian blur again. The package writes the move as a swap of two numpy
/// rows, which copies (the second assignment reads the first's result): that copy is what
/// ImageNet-C's images were made with, and what this does.
fn glass_blur<R: Rng + ?Sized>(img: &RgbImage, s: usize, rng: &mut R) -> RgbImage {
    let (sigma, d, iterations) = GLASS[s];
    let (h, w) = (img.h(), img.w());
    let x: Vec<f64> = img.data.iter().map(|&v| unit(v)).collect();
    let blurred = gaussian_filter(&x, h, w, 3, (sigma, sigma), 4.0, Edge::Nearest);
    let mut px: Vec<u8> = blurred.iter().map(|&v| (v * 255.0) as u8).collect();
    let (hi, wi) = (h as isize, w as isize);
    for _ in 0..iterations {
        for yy in ((d + 1)..=(hi - d)).rev() {
            for xx in ((d + 1)..=(wi - d)).rev() {
                let dx = rng.random_range(-d as i64..d as i64) as isize;
                let dy = rng.random_range(-d as i64..d as i64) as isize;
                let (dst, src) = (((yy * wi + xx) * 3) as usize, (((yy + dy) * wi + xx + dx) * 3) as usize);
                px.copy_within(src..src + 3, dst);
            }
        }
    }
    let x: Vec<f64> = px.iter().map(|&v| unit(v)).collect();
    let out = gaussian_filter(&x, h, w, 3, (sigma, sigma), 4.0, Edge::Nearest);
    img.with_data(out.iter().map(|&v| unit_to_u8(v)).collect())
}

/// (mean, σ of the flake draws, zoom, threshold, streak radius, streak σ, blend) of `snow`.
const SNOW: [(f64, f64, f64, f64, usize, u32, f64); 5] = [
    (0.1, 0.3, 3.0, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4.0, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
];

/// `snow` with given draws: `draws` holds the `height × width` Gaussian flake values (mean and σ
/// of the severity already applied, row-major, as numpy's `normal` draws them) and `angle_deg`
/// the streak's angle (`apply` draws it uniformly in [−135°, −45°]).
pub fn snow_with_draws(img: &RgbImage, severity: u8, draws: &[f64], angle_deg: f64) -> Result<RgbImage, CorruptError> {
    let s = check(img, Corruption::Snow, severity)?;
    check_plane(img, draws.len())?;
    Ok(snow_inner(img, s, draws, angle_deg))
}

/// The package's `snow` (v1.1.2: its numpy streak, not ImageNet-C's ImageMagick one): Gaussian
/// flakes zoomed by `clipped_zoom` (kept at the zoomed size, which can exceed the image), those
/// below the threshold dropped, clipped to [0, 1], streaked by `_motion_blur`, rounded to 8 bits
/// and cut to the image; the float32 image blended toward max(x, 1.5·gray + 0.5) (gray: OpenCV's
/// RGB→gray, 0.299 R + 0.587 G + 0.114 B in float32), then the flakes and the flakes rotated by
/// 180° added in float64.
fn snow_inner(img: &RgbImage, s: usize, draws: &[f64], angle_deg: f64) -> RgbImage {
    let (_, _, z, threshold, radius, sigma, blend) = SNOW[s];
    let (h, w) = (img.h(), img.w());
    let (mut layer, lh, lw) = clipped_zoom(draws, h, w, 1, z);
    for v in layer.iter_mut() {
        if *v < threshold {
            *v = 0.0;
        }
        *v = v.clamp(0.0, 1.0);
    }
    let streaked = motion_blur_f64(&layer, lh, lw, 1, radius, sigma, angle_deg);
    let flake = |y: usize, x: usize| f64::from((streaked[y * lw + x] * 255.0).round_ties_even() as u8) / 255.0;
    let (a, b) = (blend as f32, (1.0 - blend) as f32);
    let mut out = Vec::with_capacity(img.data.len());
    for y in 0..h {
        for x in 0..w {
            let px = &img.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
            let rgb = [0, 1, 2].map(|k| f32::from(px[k]) / 255.0);
            let bright = (rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114) * 1.5 + 0.5;
            let flakes = flake(y, x);
            let turned = flake(h - 1 - y, w - 1 - x);
            for v in rgb {
                let blended = a * v + b * v.max(bright);
                out.push(unit_to_u8(f64::from(blended) + flakes + turned));
            }
        }
    }
    img.with_data(out)
}

/// σ of `gaussian_blur`.
const GAUSSIAN_BLUR: [f64; 5] = [1.0, 2.0, 3.0, 4.0, 6.0];

/// The package's `gaussian_blur`: scikit-image's `gaussian` (`nearest` edges, 4σ) per channel.
fn gaussian_blur(img: &RgbImage, s: usize) -> RgbImage {
    let sigma = GAUSSIAN_BLUR[s];
    let x: Vec<f64> = img.data.iter().map(|&v| unit(v)).collect();
    let out = gaussian_filter(&x, img.h(), img.w(), 3, (sigma, sigma), 4.0, Edge::Nearest);
    img.with_data(out.iter().map(|&v| unit_to_u8(v)).collect())
}

/// α of `elastic_transform` (the package's 250·[0.05, 0.065, 0.085, 0.1, 0.12]).
const ELASTIC_ALPHA: [f64; 5] = [250.0 * 0.05, 250.0 * 0.065, 250.0 * 0.085, 250.0 * 0.1, 250.0 * 0.12];

/// The package's `elastic_transform` (imagecorruptions 1.1.2's, not ImageNet-C's, which adds an
/// affine warp): two displacement fields of uniform draws in ±0.005·height, smoothed by a
/// Gaussian of σ = 0.01·(height, width) (`reflect` edges, truncated at 3σ) and scaled by α, cast
/// to float32; each output value is the float32 image at (y + dy, x + dx), linearly interpolated
/// with half-sample-symmetric edges (scipy's `map_coordinates`, order 1, `reflect`).
fn elastic_transform<R: Rng + ?Sized>(img: &RgbImage, s: usize, rng: &mut R) -> RgbImage {
    let (h, w) = (img.h(), img.w());
    let alpha = ELASTIC_ALPHA[s];
    let max_d = h as f64 * 0.005;
    let sigma = (h as f64 * 0.01, w as f64 * 0.01);
    let mut field = || -> Vec<f32> {
        let u: Vec<f64> = (0..h * w).map(|_| uniform(rng, -max_d, max_d)).collect();
        gaussian_filter(&u, h, w, 1, sigma, 3.0, Edge::Reflect).iter().map(|&v| (v * alpha) as f32).collect()
    };
    let dx = field();
    let dy = field();
    elastic_inner(img, &dx, &dy)
}

/// `elastic_transform` with given displacement fields (`height × width` float32 values each,
/// row-major: the column displacement `dx` and the row displacement `dy`, as the package draws
/// them; `apply` draws them).
pub fn elastic_with_fields(img: &RgbImage, severity: u8, dx: &[f32], dy: &[f32]) -> Result<RgbImage, CorruptError> {
    check(img, Corruption::ElasticTransform, severity)?;
    check_plane(img, dx.len())?;
    check_plane(img, dy.len())?;
    Ok(elastic_inner(img, dx, dy))
}

fn elastic_inner(img: &RgbImage, dx: &[f32], dy: &[f32]) -> RgbImage {
    let (h, w) = (img.h(), img.w());
    let x: Vec<f32> = img.data.iter().map(|&v| f32::from(v) / 255.0).collect();
    let mut out = Vec::with_capacity(x.len());
    let reflect = |i: f64, n: usize| Edge::index(Edge::Reflect, i as isize, n);
    for yy in 0..h {
        for xx in 0..w {
            let cy = yy as f64 + f64::from(dy[yy * w + xx]);
            let cx = xx as f64 + f64::from(dx[yy * w + xx]);
            let (fy, fx) = (cy.floor(), cx.floor());
            let (ty, tx) = (cy - fy, cx - fx);
            let (y0, y1) = (reflect(fy, h), reflect(fy + 1.0, h));
            let (x0, x1) = (reflect(fx, w), reflect(fx + 1.0, w));
            for k in 0..3 {
                let at = |y: usize, x_: usize| f64::from(x[(y * w + x_) * 3 + k]);
                let mut v = at(y0, x0) * (1.0 - ty) * (1.0 - tx);
                v += at(y0, x1) * (1.0 - ty) * tx;
                v += at(y1, x0) * ty * (1.0 - tx);
                v += at(y1, x1) * ty * tx;
                out.push(((v as f32).clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
    }
    img.with_data(out)
}

/// scale of `speckle_noise`'s multiplicative Gaussian noise.
const SPECKLE: [f64; 5] = [0.15, 0.2, 0.35, 0.45, 0.6];

/// (factor, offset) of `saturate` on the HSV saturation.
const SATURATE: [(f64, f64); 5] = [(0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)];

fn saturate(img: &RgbImage, s: usize) -> RgbImage {
    let (a, b) = SATURATE[s];
    let mut out = Vec::with_capacity(img.data.len());
    for px in img.data.chunks_exact(3) {
        let rgb = hsv_round_trip([unit(px[0]), unit(px[1]), unit(px[2])], |s, v| ((s * a + b).clamp(0.0, 1.0), v));
        out.extend(rgb.iter().map(|&v| unit_to_u8(v)));
    }
    img.with_data(out)
}

/// sRGB transfer function, decoding (IEC 61966-2-1).
fn srgb_to_linear(v: f64) -> f64 {
    if v <= 0.04045 { v / 12.92 } else { ((v + 0.055) / 1.055).powf(2.4) }
}

/// sRGB transfer function, encoding.
fn linear_to_srgb(v: f64) -> f64 {
    if v <= 0.0031308 { v * 12.92 } else { 1.055 * v.powf(1.0 / 2.4) - 0.055 }
}

fn low_light<R: Rng + ?Sized>(img: &RgbImage, s: usize, rng: &mut R) -> RgbImage {
    let exposure = LOW_LIGHT_EXPOSURE[s];
    map_values(img, |v| {
        let electrons = srgb_to_linear(unit(v)) * exposure * LOW_LIGHT_FULL_SCALE_E;
        let read: f64 = StandardNormal.sample(rng);
        let signal = (poisson(electrons, rng) + LOW_LIGHT_READ_NOISE_E * read) / LOW_LIGHT_FULL_SCALE_E;
        (linear_to_srgb(signal.clamp(0.0, 1.0)) * 255.0).round() as u8
    })
}

/// The lossy path of a baseline JPEG round trip as libjpeg(-turbo) runs it with Pillow's
/// settings (`save(quality=q)`, then decoding to RGB): every step is integer arithmetic, so the
/// result is exact, not approximate.
mod jpeg {
    use super::RgbImage;

    /// The IJG (JPEG Annex K) quantisation tables, natural order.
    const LUMA: [u32; 64] = [
        16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29,
        51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121,
        120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
    ];
    const CHROMA: [u32; 64] = [
        17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99,
        99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
        99, 99, 99, 99, 99, 99, 99, 99,
    ];

    /// `jpeg_set_quality(quality, force_baseline = TRUE)`.
    fn scaled_table(base: &[u32; 64], quality: u32) -> [u32; 64] {
        let q = quality.clamp(1, 100);
        let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
        base.map(|v| ((v * scale + 50) / 100).clamp(1, 255))
    }

    /// The encoder's quantisation (jcdctmgr.c): multiplication by a 16-bit reciprocal of
    /// `8·q` (the DCT output carries a factor 8) with libjpeg-turbo's rounding correction.
    struct Divisor {
        recip: u64,
        corr: u64,
        shift: u32,
    }

    impl Divisor {
        fn new(q: u32) -> Divisor {
            let d = u64::from(q) << 3;
            let b = 63 - d.leading_zeros(); // floor(log2 d)
            let mut r = 16 + b;
            let mut fq = (1u64 << r) / d;
            let fr = (1u64 << r) % d;
            let mut c = d / 2;
            if fr == 0 {
                fq >>= 1;
                r -= 1;
            } else if fr <= d / 2 {
                c += 1;
            } else {
                fq += 1;
            }
            Divisor { recip: fq, corr: c, shift: r }
        }

        fn quantize(&self, x: i32) -> i32 {
            let q = ((u64::from(x.unsigned_abs()) + self.corr) * self.recip) >> self.shift;
            if x < 0 { -(q as i32) } else { q as i32 }
        }
    }

    // jfdctint.c / jidctint.c constants: FIX(x) = round(x · 2^13).
    const CONST_BITS: u32 = 13;
    const PASS1_BITS: u32 = 2;
    const F_0_298: i64 = 2446;
    const F_0_390: i64 = 3196;
    const F_0_541: i64 = 4433;
    const F_0_765: i64 = 6270;
    const F_0_899: i64 = 7373;
    const F_1_175: i64 = 9633;
    const F_1_501: i64 = 12299;
    const F_1_847: i64 = 15137;
    const F_1_961: i64 = 16069;
    const F_2_053: i64 = 16819;
    const F_2_562: i64 = 20995;
    const F_3_072: i64 = 25172;

    fn descale(x: i64, n: u32) -> i64 {
        (x + (1 << (n - 1))) >> n
    }

    /// The slow-but-accurate integer forward DCT (Loeffler–Ligtenberg–Moschytz), one 1-D pass
    /// over eight values `v[i·stride]`. Pass 1 keeps PASS1_BITS extra bits, pass 2 removes them;
    /// the output is 8× the orthonormal DCT.
    fn fdct_1d(v: &mut [i64], base: usize, stride: usize, pass1: bool) {
        let g = |i: usize| v[base + i * stride];
        let (tmp0, tmp7) = (g(0) + g(7), g(0) - g(7));
        let (tmp1, tmp6) = (g(1) + g(6), g(1) - g(6));
        let (tmp2, tmp5) = (g(2) + g(5), g(2) - g(5));
        let (tmp3, tmp4) = (g(3) + g(4), g(3) - g(4));
        let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
        let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);
        let shift = if pass1 { CONST_BITS - PASS1_BITS } else { CONST_BITS + PASS1_BITS };
        let mut out = [0i64; 8];
        if pass1 {
            out[0] = (tmp10 + tmp11) << PASS1_BITS;
            out[4] = (tmp10 - tmp11) << PASS1_BITS;
        } else {
            out[0] = descale(tmp10 + tmp11, PASS1_BITS);
            out[4] = descale(tmp10 - tmp11, PASS1_BITS);
        }
        let z1 = (tmp12 + tmp13) * F_0_541;
        out[2] = descale(z1 + tmp13 * F_0_765, shift);
        out[6] = descale(z1 - tmp12 * F_1_847, shift);
        let (z1, z2, z3, z4) = (tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7);
        let z5 = (z3 + z4) * F_1_175;
        let (t4, t5, t6, t7) = (tmp4 * F_0_298, tmp5 * F_2_053, tmp6 * F_3_072, tmp7 * F_1_501);
        let (z1, z2) = (-z1 * F_0_899, -z2 * F_2_562);
        let (z3, z4) = (-z3 * F_1_961 + z5, -z4 * F_0_390 + z5);
        out[7] = descale(t4 + z1 + z3, shift);
        out[5] = descale(t5 + z2 + z4, shift);
        out[3] = descale(t6 + z2 + z3, shift);
        out[1] = descale(t7 + z1 + z4, shift);
        for (i, o) in out.iter().enumerate() {
            v[base + i * stride] = *o;
        }
    }

    /// The integer inverse DCT's 1-D pass over eight values; returns them before the final
    /// descaling (`shift` bits).
    fn idct_1d(g: [i64; 8], shift: u32) -> [i64; 8] {
        let (z2, z3) = (g[2], g[6]);
        let z1 = (z2 + z3) * F_0_541;
        let tmp2 = z1 - z3 * F_1_847;
        let tmp3 = z1 + z2 * F_0_765;
        let tmp0 = (g[0] + g[4]) << CONST_BITS;
        let tmp1 = (g[0] - g[4]) << CONST_BITS;
        let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
        let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);
        let (t0, t1, t2, t3) = (g[7], g[5], g[3], g[1]);
        let (z1, z2, z3, z4) = (t0 + t3, t1 + t2, t0 + t2, t1 + t3);
        let z5 = (z3 + z4) * F_1_175;
        let (t0, t1, t2, t3) = (t0 * F_0_298, t1 * F_2_053, t2 * F_3_072, t3 * F_1_501);
        let (z1, z2) = (-z1 * F_0_899, -z2 * F_2_562);
        let (z3, z4) = (-z3 * F_1_961 + z5, -z4 * F_0_390 + z5);
        let (t0, t1, t2, t3) = (t0 + z1 + z3, t1 + z2 + z4, t2 + z2 + z3, t3 + z1 + z4);
        [
            descale(tmp10 + t3, shift),
            descale(tmp11 + t2, shift),
            descale(tmp12 + t1, shift),
            descale(tmp13 + t0, shift),
            descale(tmp13 - t0, shift),
            descale(tmp12 - t1, shift),
            descale(tmp11 - t2, shift),
            descale(tmp10 - t3, shift),
        ]
    }

    /// The decoder's post-IDCT range limit: the value masked to 10 bits (so wild values wrap as
    /// libjpeg's table lookup does), then level-shifted and clamped.
    fn idct_limit(v: i64) -> u8 {
        let j = (v & 1023) as i32;
        let j = if j >= 512 { j - 1024 } else { j };
        (j + 128).clamp(0, 255) as u8
    }

    /// Compresses and decompresses one 8×8 block of samples in place.
    fn block_round_trip(block: &mut [u8; 64], table: &[u32; 64], divisors: &[Divisor]) {
        let mut ws = [0i64; 64];
        for (w, &s) in ws.iter_mut().zip(block.iter()) {
            *w = i64::from(s) - 128;
        }
        for row in 0..8 {
            fdct_1d(&mut ws, row * 8, 1, true);
        }
        for col in 0..8 {
            fdct_1d(&mut ws, col, 8, false);
        }
        // Quantised coefficient times the table entry: what the decoder multiplies back.
        let deq: Vec<i64> =
            (0..64).map(|i| i64::from(divisors[i].quantize(ws[i] as i32)) * i64::from(table[i])).collect();
        let mut mid = [0i64; 64];
        for col in 0..8 {
            let column = std::array::from_fn(|r| deq[r * 8 + col]);
            for (r, v) in idct_1d(column, CONST_BITS - PASS1_BITS).iter().enumerate() {
                mid[r * 8 + col] = *v;
            }
        }
        for row in 0..8 {
            let r: [i64; 8] = std::array::from_fn(|c| mid[row * 8 + c]);
            for (c, v) in idct_1d(r, CONST_BITS + PASS1_BITS + 3).iter().enumerate() {
                block[row * 8 + c] = idct_limit(*v);
            }
        }
    }

    /// Runs every 8×8 block of a `w × h` plane (both multiples of 8) through the codec.
    fn plane_round_trip(plane: &mut [u8], w: usize, h: usize, table: &[u32; 64]) {
        let divisors: Vec<Divisor> = table.iter().map(|&q| Divisor::new(q)).collect();
        for by in (0..h).step_by(8) {
            for bx in (0..w).step_by(8) {
                let mut block = [0u8; 64];
                for y in 0..8 {
                    block[y * 8..y * 8 + 8].copy_from_slice(&plane[(by + y) * w + bx..(by + y) * w + bx + 8]);
                }
                block_round_trip(&mut block, table, &divisors);
                for y in 0..8 {
                    plane[(by + y) * w + bx..(by + y) * w + bx + 8].copy_from_slice(&block[y * 8..y * 8 + 8]);
                }
            }
        }
    }

    /// FIX(x) with 16 fractional bits, as jccolor.c / jdcolor.c.
    fn fix16(x: f64) -> i64 {
        (x * 65536.0 + 0.5) as i64
    }

    pub(super) fn round_trip(img: &RgbImage, quality: u32) -> RgbImage {
        let (w, h) = (img.w(), img.h());
        let luma_q = scaled_table(&LUMA, quality);
        let chroma_q = scaled_table(&CHROMA, quality);
        // RGB -> YCbCr (jccolor.c): 16-bit fixed point, Cb/Cr rounded with 0.5 - epsilon.
        let half = 1i64 << 15;
        let offset = 128i64 << 16;
        let (ry, gy, by) = (fix16(0.29900), fix16(0.58700), fix16(0.11400));
        let (rcb, gcb, bcb) = (fix16(0.16874), fix16(0.33126), fix16(0.5));
        let (gcr, bcr) = (fix16(0.41869), fix16(0.08131));
        let mut yy = vec![0u8; w * h];
        let mut cb = vec![0u8; w * h];
        let mut cr = vec![0u8; w * h];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            let (r, g, b) = (i64::from(px[0]), i64::from(px[1]), i64::from(px[2]));
            yy[i] = ((ry * r + gy * g + by * b + half) >> 16) as u8;
            cb[i] = ((-rcb * r - gcb * g + bcb * b + offset + half - 1) >> 16) as u8;
            cr[i] = ((bcb * r - gcr * g - bcr * b + offset + half - 1) >> 16) as u8;
        }
        // Luma: padded to whole blocks by repeating the last column and row.
        let (yw, yh) = (w.div_ceil(8) * 8, h.div_ceil(8) * 8);
        let mut yplane: Vec<u8> = (0..yw * yh).map(|i| yy[(i / yw).min(h - 1) * w + (i % yw).min(w - 1)]).collect();
        plane_round_trip(&mut yplane, yw, yh, &luma_q);
        // Chroma, 2×2 down-sampled (jcsample.c h2v2_downsample): the input row is extended to
        // twice the chroma block width by repeating its last sample, an odd last row pairs with
        // itself, rounding alternates 1, 2, 1, 2 along the row; the chroma rows are then padded
        // to whole blocks by repeating the last one.
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (pw, ph) = (w.div_ceil(16) * 8, h.div_ceil(16) * 8);
        let down = |src: &[u8]| -> Vec<u8> {
            let at = |x: usize, y: usize| u32::from(src[y.min(h - 1) * w + x.min(w - 1)]);
            let mut out = vec![0u8; pw * ph];
            for oy in 0..ph {
                let iy = 2 * oy.min(ch - 1);
                for ox in 0..pw {
                    let bias = if ox % 2 == 0 { 1 } else { 2 };
                    let s = at(2 * ox, iy) + at(2 * ox + 1, iy) + at(2 * ox, iy + 1) + at(2 * ox + 1, iy + 1);
                    out[oy * pw + ox] = ((s + bias) >> 2) as u8;
                }
            }
            out
        };
        let mut cbp = down(&cb);
        let mut crp = down(&cr);
        plane_round_trip(&mut cbp, pw, ph, &chroma_q);
        plane_round_trip(&mut crp, pw, ph, &chroma_q);
        // Fancy up-sampling (jdsample.c h2v2_fancy_upsample) of the ch × cw real samples:
        // 3/4 nearer + 1/4 farther in each direction, rounding biases 8 and 7 alternating, the
        // image's first and last rows and columns repeated as context.
        let up = |p: &[u8]| -> Vec<u8> {
            let at = |x: usize, y: isize| i32::from(p[(y.clamp(0, ch as isize - 1) as usize) * pw + x]);
            let mut out = vec![0u8; 2 * cw * 2 * ch];
            for iy in 0..ch {
                for v in 0..2 {
                    let other = if v == 0 { iy as isize - 1 } else { iy as isize + 1 };
                    let colsum = |x: usize| at(x, iy as isize) * 3 + at(x, other);
                    let row = &mut out[(2 * iy + v) * 2 * cw..(2 * iy + v + 1) * 2 * cw];
                    for x in 0..cw {
                        let this = colsum(x);
                        let last = if x == 0 { this } else { colsum(x - 1) };
                        let next = if x + 1 == cw { this } else { colsum(x + 1) };
                        row[2 * x] = ((this * 3 + last + 8) >> 4) as u8;
                        row[2 * x + 1] = ((this * 3 + next + 7) >> 4) as u8;
                    }
                }
            }
            out
        };
        let cbu = up(&cbp);
        let cru = up(&crp);
        // YCbCr -> RGB (jdcolor.c): tables with 16-bit fixed point, results clamped.
        let (fr, fb, fgr, fgb) = (fix16(1.40200), fix16(1.77200), fix16(0.71414), fix16(0.34414));
        let mut out = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let l = i64::from(yplane[y * yw + x]);
                let cbv = i64::from(cbu[y * 2 * cw + x]) - 128;
                let crv = i64::from(cru[y * 2 * cw + x]) - 128;
                let r = l + ((fr * crv + half) >> 16);
                let g = l + ((-fgb * cbv + half - fgr * crv) >> 16);
                let b = l + ((fb * cbv + half) >> 16);
                let o = (y * w + x) * 3;
                out[o] = r.clamp(0, 255) as u8;
                out[o + 1] = g.clamp(0, 255) as u8;
                out[o + 2] = b.clamp(0, 255) as u8;
            }
        }
        img.with_data(out)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn flat_block_is_dc_only() {
            // A flat block has only a DC coefficient; the islow output is 8× the orthonormal DCT,
            // whose DC is 8 × the value: 64 × 37.
            let mut ws = [37i64; 64];
            for row in 0..8 {
                fdct_1d(&mut ws, row * 8, 1, true);
            }
            for col in 0..8 {
                fdct_1d(&mut ws, col, 8, false);
            }
            assert_eq!(ws[0], 37 * 64);
            assert!(ws[1..].iter().all(|&v| v == 0), "{ws:?}");
        }

        #[test]
        fn reciprocal_quantisation_is_rounded_division() {
            // libjpeg-turbo's reciprocal must agree with round-half-away division by 8q.
            for q in 1..=255u32 {
                let d = Divisor::new(q);
                for x in -9000i32..=9000 {
                    let m = 8 * q as i32;
                    let expect = (x.abs() + m / 2) / m * x.signum();
                    assert_eq!(d.quantize(x), expect, "q {q} x {x}");
                }
            }
        }

        #[test]
        fn quality_tables_match_libjpeg() {
            // quality 25: scale 200 %; quality 7: 714 %, clamped to 255 for baseline.
            assert_eq!(scaled_table(&LUMA, 25)[0], 32);
            assert_eq!(scaled_table(&LUMA, 7)[0], 114);
            assert_eq!(scaled_table(&LUMA, 7)[63], 255);
            assert_eq!(scaled_table(&CHROMA, 18)[0], 47);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_valid_names() {
        for c in Corruption::ALL {
            assert_eq!(c.name().parse::<Corruption>(), Ok(c));
        }
        assert_eq!("Gaussian-Noise".parse::<Corruption>(), Ok(Corruption::GaussianNoise));
        let e = "fgo".parse::<Corruption>().unwrap_err();
        assert!(e.to_string().contains("unknown corruption `fgo`") && e.to_string().contains("low_light"), "{e}");
        assert_eq!("Frost".parse::<Corruption>(), Ok(Corruption::Frost));
        assert_eq!("Spatter".parse::<Corruption>(), Ok(Corruption::Spatter));
    }

    #[test]
    fn reflect101_matches_opencv() {
        let idx: Vec<usize> = (-3..8).map(|i| reflect101(i, 5)).collect();
        assert_eq!(idx, vec![3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]);
    }

    #[test]
    fn numpy_sum_blocks() {
        // The summation order shows where rounding happens: numpy gives 1e16 + 16 here
        // (np.sum(np.array([1e16] + [1.0] * 20))), a left-to-right sum 1e16.
        let v: Vec<f64> = (0..21).map(|i| if i == 0 { 1e16 } else { 1.0 }).collect();
        assert_eq!(numpy_sum(&v) - 1e16, 16.0);
        assert_eq!(v.iter().fold(0.0, |s, x| s + x) - 1e16, 0.0);
    }

    #[test]
    fn pillow_box_weights_sum_to_one() {
        for (i, o) in [(32, 19), (48, 28), (64, 16), (33, 8)] {
            for (_, k) in pillow_box_coeffs(i, o) {
                let s: i64 = k.iter().sum();
                assert!((s - (1 << 22)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn disk_kernel_sums_near_one() {
        for (r, a) in DEFOCUS {
            let (k, n) = disk_kernel(r, a);
            assert_eq!(k.len(), n * n);
            let s: f64 = k.iter().sum();
            // radius 8 touches the 17x17 grid's edge, where reflect-101 adds mass (≈ +1.3 %).
            assert!((s - 1.0).abs() < 0.02, "radius {r}: {s}");
        }
    }

    #[test]
    fn rejects_small_images_and_bad_severities() {
        let mut rng = rand::rngs::Xoshiro256PlusPlus::seed_from_u64(0);
        let small = RgbImage::new(31, 40, vec![0; 31 * 40 * 3]).unwrap();
        assert!(matches!(
            apply(&small, Corruption::Fog, 1, &mut rng),
            Err(CorruptError::ImageTooSmall { width: 31, height: 40 })
        ));
        let ok = RgbImage::new(32, 32, vec![0; 32 * 32 * 3]).unwrap();
        for sev in [0u8, 6] {
            let e = apply(&ok, Corruption::Contrast, sev, &mut rng).unwrap_err();
            assert_eq!(e.to_string(), format!("severity {sev} of contrast is outside 1..=5"));
        }
        assert!(RgbImage::new(2, 2, vec![0; 11]).is_err());
    }
}
