//! `spatter` (one of the package's four extra corruptions) as `imagecorruptions` 1.1.2 makes it.
//!
//! A liquid layer: numpy's normal draws (one per pixel; mean 0.65 or 0.67, σ 0.3 or 0.4) smoothed
//! by scikit-image's `gaussian` (σ 4, 3, 2, 1, 1) and set to 0 below a threshold (0.69, 0.68,
//! 0.68, 0.65, 0.65). Then, by severity:
//!
//! - **water** (1–3): the layer cast to 8 bits (`(layer·255).astype(uint8)`: truncated, and
//!   taken modulo 256 where it exceeds 1, as numpy's cast does), its edges found by OpenCV's
//!   `Canny(50, 150)`, their distance transform (`DIST_L2`, 5×5 mask) clipped at 20, a 3×3 box
//!   blur, truncated to 8 bits, `equalizeHist`, an emboss `filter2D` with the kernel
//!   `[[−2, −1, 0], [−1, 1, 1], [0, 1, 2]]` and another 3×3 box blur. The product of the 8-bit
//!   layer and that texture, divided by its maximum and scaled by 0.6, 0.6, 0.5, weighs a pale
//!   turquoise (175, 238, 238) added to the image, all in float32;
//! - **mud** (4–5): a mask of the layer above its threshold, smoothed by `gaussian` (σ 1.5, in
//!   float32), set to 0 below 0.8; the image keeps `1 − mask` of itself and gains `mask` of a
//!   mud brown (63, 42, 20).
//!
//! The OpenCV steps are OpenCV's own arithmetic, operation for operation ([`canny`],
//! [`distance_transform`], [`box_blur_f32`], [`equalize_hist`], [`filter2d_u8`],
//! [`box_blur_u8`]): Sobel 3×3 gradients with replicated borders, the L1 magnitude, non-maximum
//! suppression along the gradient's octant (`tan 22.5°` in 15-bit fixed point, the strict and
//! non-strict comparisons of OpenCV's), hysteresis over 8-neighbours; the two-pass 5×5 chamfer
//! distance with steps 1, 1.4 and 2.1969 in 16.16 fixed point; box filters with reflect-101
//! borders, the float one summed in float64 and scaled by 1/9, the 8-bit one rounded to nearest.
//! OpenCV's x86 wheels run the distance transform through Intel IPP by default, whose steps are
//! float32 (1.4 rounded to float32 rather than 91750/65536): on 0–2.3 % of frames (300 draws
//! per water severity on a 32×32 digit and a 64×48 photograph) this moves a box-blurred distance
//! across an integer, and through `equalizeHist` the output by up to 11 levels on 10–130 values
//! (`tests/fixtures/corrupt/spatter/` keeps such a draw, both outputs tested).
//!
//! One deliberate difference: where no pixel of the liquid layer passes the threshold (a water
//! severity on a small image, about 2 % of 32×32 frames at severity 1), the package divides 0 by
//! 0 and `corrupt()` casts the NaNs to 0, returning a black frame; here the layer is empty and
//! the image passes through the same float32 arithmetic with nothing added.

use rand::Rng;

use super::{CorruptError, Corruption, Edge, RgbImage, check, check_plane, gaussian_filter, normal_plane, reflect101};

/// (mean, σ of the draws, σ of the smoothing, threshold, intensity, mud) per severity: the
/// package's `c`.
pub const SPATTER: [(f64, f64, f64, f64, f64, bool); 5] = [
    (0.65, 0.3, 4.0, 0.69, 0.6, false),
    (0.65, 0.3, 3.0, 0.68, 0.6, false),
    (0.65, 0.3, 2.0, 0.68, 0.5, false),
    (0.65, 0.3, 1.0, 0.65, 1.5, true),
    (0.67, 0.4, 1.0, 0.65, 1.5, true),
];

/// The emboss kernel of the water branch (`filter2D` correlates: row-major, not flipped).
pub const EMBOSS: [[i32; 3]; 3] = [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]];

/// `spatter` with given draws: `draws` holds the `height × width` normal values (mean and σ of
/// the severity already applied, row-major, as numpy's `normal` draws them).
pub fn spatter_with_draws(img: &RgbImage, severity: u8, draws: &[f64]) -> Result<RgbImage, CorruptError> {
    let s = check(img, Corruption::Spatter, severity)?;
    check_plane(img, draws.len())?;
    Ok(spatter_inner(img, s, draws))
}

/// `spatter` drawing its normal values from `rng`.
pub(super) fn spatter<R: Rng + ?Sized>(img: &RgbImage, s: usize, rng: &mut R) -> RgbImage {
    let (mean, sd, ..) = SPATTER[s];
    spatter_inner(img, s, &normal_plane(img, mean, sd, rng))
}

fn spatter_inner(img: &RgbImage, s: usize, draws: &[f64]) -> RgbImage {
    let (_, _, sigma, threshold, intensity, mud) = SPATTER[s];
    let (h, w) = (img.h(), img.w());
    let mut layer = gaussian_filter(draws, h, w, 1, (sigma, sigma), 4.0, Edge::Nearest);
    for v in layer.iter_mut() {
        if *v < threshold {
            *v = 0.0;
        }
    }
    // np.array(x, dtype=np.float32) / 255.
    let unit32 = |v: u8| f32::from(v) / 255.0f32;
    if mud {
        let mask: Vec<f64> = layer.iter().map(|&v| if v > threshold { 1.0 } else { 0.0 }).collect();
        let mut m = gaussian_filter_f32(&mask, h, w, intensity);
        for v in m.iter_mut() {
            if *v < 0.8f32 {
                *v = 0.0;
            }
        }
        let brown = [63.0 / 255.0, 42.0 / 255.0, 20.0 / 255.0];
        let mut out = Vec::with_capacity(img.data.len());
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            let keep = 1.0f32 - m[i];
            for k in 0..3 {
                let x = unit32(px[k]) * keep;
                let y = f64::from(x) + brown[k] * f64::from(m[i]);
                out.push((y.clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
        return img.with_data(out);
    }
    // (layer * 255).astype(np.uint8): truncation, modulo 256 above 255.
    let layer8: Vec<u8> = layer.iter().map(|&v| (v * 255.0) as i64 as u8).collect();
    let edges = canny(&layer8, h, w, 50.0, 150.0);
    let not_edges: Vec<u8> = edges.iter().map(|&e| 255 - e).collect();
    let dist: Vec<f32> = distance_transform(&not_edges, h, w).into_iter().map(|d| d.min(20.0)).collect();
    let dist8: Vec<u8> = box_blur_f32(&dist, h, w).into_iter().map(|d| d as u8).collect();
    let texture = box_blur_u8(&filter2d_u8(&equalize_hist(&dist8), h, w, &EMBOSS), h, w);
    let m: Vec<f32> = layer8.iter().zip(&texture).map(|(&l, &t)| f32::from(l) * f32::from(t)).collect();
    let max = m.iter().fold(0.0f32, |a, &b| a.max(b));
    let turquoise = [(175.0 / 255.0) as f32, (238.0 / 255.0) as f32, (238.0 / 255.0) as f32];
    let mut out = Vec::with_capacity(img.data.len());
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        // The package's 0/0 when the layer is empty (module docs): nothing is added.
        let weight = if max > 0.0 { m[i] / max * intensity as f32 } else { 0.0 };
        for k in 0..3 {
            let y = unit32(px[k]) + weight * turquoise[k];
            out.push((y.clamp(0.0, 1.0) * 255.0f32) as u8);
        }
    }
    img.with_data(out)
}

/// scikit-image's `gaussian` on a float32 image (one channel, `nearest` edges, 4σ): scipy's
/// `gaussian_filter` writing each axis's pass to a float32 output (the sums in float64).
fn gaussian_filter_f32(data: &[f64], h: usize, w: usize, sigma: f64) -> Vec<f32> {
    let rows = gaussian_filter(data, h, w, 1, (sigma, 0.0), 4.0, Edge::Nearest);
    let rows: Vec<f64> = rows.iter().map(|&v| f64::from(v as f32)).collect();
    gaussian_filter(&rows, h, w, 1, (0.0, sigma), 4.0, Edge::Nearest).iter().map(|&v| v as f32).collect()
}

/// The pixel at (`y`, `x`) of an `h × w` plane with the border replicated.
fn replicate<T: Copy>(src: &[T], h: usize, w: usize, y: isize, x: isize) -> T {
    src[y.clamp(0, h as isize - 1) as usize * w + x.clamp(0, w as isize - 1) as usize]
}

/// OpenCV's `Canny(src, low, high)` (aperture 3, L1 gradient) on an 8-bit `h × w` plane: 255 on
/// the edges, 0 elsewhere.
///
/// Gradients by 3×3 Sobel with replicated borders, magnitude `|dx| + |dy|` (magnitudes outside
/// the plane are 0). A pixel above `⌊low⌋` is a local maximum when it is `>` its neighbour on
/// one side and `>=` (`>` on diagonals) on the other along the gradient's octant, chosen with
/// `tan 22.5°` in 15-bit fixed point; a maximum above `⌊high⌋` seeds an edge, and the edges grow
/// through the other maxima over 8-neighbours.
pub fn canny(src: &[u8], h: usize, w: usize, low: f64, high: f64) -> Vec<u8> {
    const SHIFT: i64 = 15;
    // (int)(tan(22.5°)·2^15 + 0.5)
    const TG22: i64 = 13573;
    let (low, high) = (low.min(high).floor() as i64, low.max(high).floor() as i64);
    let p = |y: isize, x: isize| i64::from(replicate(src, h, w, y, x));
    let mut dx = vec![0i64; h * w];
    let mut dy = vec![0i64; h * w];
    let mut mag = vec![0i64; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let gx = p(y - 1, x + 1) + 2 * p(y, x + 1) + p(y + 1, x + 1)
                - p(y - 1, x - 1)
                - 2 * p(y, x - 1)
                - p(y + 1, x - 1);
            let gy = p(y + 1, x - 1) + 2 * p(y + 1, x) + p(y + 1, x + 1)
                - p(y - 1, x - 1)
                - 2 * p(y - 1, x)
                - p(y - 1, x + 1);
            let i = y as usize * w + x as usize;
            dx[i] = gx;
            dy[i] = gy;
            mag[i] = gx.abs() + gy.abs();
        }
    }
    let m_at = |y: isize, x: isize| {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize { 0 } else { mag[y as usize * w + x as usize] }
    };
    // 0: a maximum that may join an edge, 1: no edge, 2: an edge; a border of 1 around the plane.
    let (mh, mw) = (h + 2, w + 2);
    let mut map = vec![1u8; mh * mw];
    let mut stack = Vec::new();
    for y in 0..h {
        let mut prev_flag = false;
        for x in 0..w {
            let (yi, xi) = (y as isize, x as isize);
            let i = y * w + x;
            let at = (y + 1) * mw + x + 1;
            let m = mag[i];
            let mut maximum = false;
            if m > low {
                let (xs, ys) = (dx[i], dy[i]);
                let ax = xs.abs();
                let ay = ys.abs() << SHIFT;
                let tg22x = ax * TG22;
                if ay < tg22x {
                    maximum = m > m_at(yi, xi - 1) && m >= m_at(yi, xi + 1);
                } else {
                    let tg67x = tg22x + (ax << (SHIFT + 1));
                    if ay > tg67x {
                        maximum = m > m_at(yi - 1, xi) && m >= m_at(yi + 1, xi);
                    } else {
                        let s = if (xs ^ ys) < 0 { -1 } else { 1 };
                        maximum = m > m_at(yi - 1, xi - s) && m > m_at(yi + 1, xi + s);
                    }
                }
            }
            if !maximum {
                prev_flag = false;
                map[at] = 1;
                continue;
            }
            if !prev_flag && m > high && map[at - mw] != 2 {
                map[at] = 2;
                stack.push(at);
                prev_flag = true;
            } else {
                map[at] = 0;
            }
        }
    }
    while let Some(at) = stack.pop() {
        for n in [at - 1, at + 1, at - mw - 1, at - mw, at - mw + 1, at + mw - 1, at + mw, at + mw + 1] {
            if map[n] == 0 {
                map[n] = 2;
                stack.push(n);
            }
        }
    }
    (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .map(|(y, x)| if map[(y + 1) * mw + x + 1] == 2 { 255 } else { 0 })
        .collect()
}

/// OpenCV's `distanceTransform(src, DIST_L2, 5)`: for every non-zero pixel of the 8-bit
/// `h × w` plane, the 5×5 chamfer distance to the nearest zero one (steps 1, 1.4 and 2.1969 as
/// 16.16 fixed point, 65536, 91750 and 143976; OpenCV's forward then backward pass), in float32.
/// A plane without zeros gives values far above any image's size.
pub fn distance_transform(src: &[u8], h: usize, w: usize) -> Vec<f32> {
    const HV: i64 = 65536;
    const DIAG: i64 = 91750;
    const LONG: i64 = 143976;
    const FAR: i64 = (i32::MAX >> 2) as i64;
    const B: usize = 2;
    let (th, tw) = (h + 2 * B, w + 2 * B);
    let mut t = vec![FAR; th * tw];
    for y in 0..h {
        for x in 0..w {
            let at = (y + B) * tw + x + B;
            if src[y * w + x] == 0 {
                t[at] = 0;
                continue;
            }
            let mut d = FAR.min(t[at - 2 * tw - 1] + LONG);
            for (off, step) in [
                (at - 2 * tw + 1, LONG),
                (at - tw - 2, LONG),
                (at - tw - 1, DIAG),
                (at - tw, HV),
                (at - tw + 1, DIAG),
                (at - tw + 2, LONG),
                (at - 1, HV),
            ] {
                d = d.min(t[off] + step);
            }
            t[at] = d;
        }
    }
    let mut out = vec![0.0f32; h * w];
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let at = (y + B) * tw + x + B;
            let mut d = t[at];
            if d > HV {
                for (off, step) in [
                    (at + 2 * tw + 1, LONG),
                    (at + 2 * tw - 1, LONG),
                    (at + tw + 2, LONG),
                    (at + tw + 1, DIAG),
                    (at + tw, HV),
                    (at + tw - 1, DIAG),
                    (at + tw - 2, LONG),
                    (at + 1, HV),
                ] {
                    d = d.min(t[off] + step);
                }
                t[at] = d;
            }
            out[y * w + x] = d as f32 * (1.0 / 65536.0);
        }
    }
    out
}

/// The 3×3 neighbourhood sum of an `h × w` plane with reflect-101 borders.
fn sum3<T: Copy>(src: &[T], h: usize, w: usize, y: usize, x: usize, mut add: impl FnMut(T)) {
    for dy in -1..=1isize {
        let yy = reflect101(y as isize + dy, h);
        for dx in -1..=1isize {
            add(src[yy * w + reflect101(x as isize + dx, w)]);
        }
    }
}

/// OpenCV's `blur(src, (3, 3))` on a float32 plane: the 9 values summed in float64, times
/// 1/9 in float64, rounded to float32; reflect-101 borders.
pub fn box_blur_f32(src: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let mut s = 0.0f64;
            sum3(src, h, w, y, x, |v| s += f64::from(v));
            out.push((s * (1.0 / 9.0)) as f32);
        }
    }
    out
}

/// OpenCV's `blur(src, (3, 3))` on an 8-bit plane: the integer sum times 1/9, rounded to
/// nearest; reflect-101 borders.
pub fn box_blur_u8(src: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let mut s = 0u32;
            sum3(src, h, w, y, x, |v| s += u32::from(v));
            out.push((f64::from(s) * (1.0 / 9.0)).round_ties_even() as u8);
        }
    }
    out
}

/// OpenCV's `filter2D(src, CV_8U, kernel)` with a 3×3 integer kernel: the correlation (kernel not
/// flipped, anchored at its centre) with reflect-101 borders, saturated to 0..=255.
pub fn filter2d_u8(src: &[u8], h: usize, w: usize, kernel: &[[i32; 3]; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let mut s = 0i32;
            for (ky, row) in kernel.iter().enumerate() {
                let yy = reflect101(y as isize + ky as isize - 1, h);
                for (kx, &k) in row.iter().enumerate() {
                    s += k * i32::from(src[yy * w + reflect101(x as isize + kx as isize - 1, w)]);
                }
            }
            out.push(s.clamp(0, 255) as u8);
        }
    }
    out
}

/// OpenCV's `equalizeHist`: the cumulative histogram from the first occupied level on, scaled
/// by `255/(n − count of that level)` in float32 and rounded to nearest even; a plane of one
/// level stays as it is.
pub fn equalize_hist(src: &[u8]) -> Vec<u8> {
    let mut hist = [0u32; 256];
    for &v in src {
        hist[usize::from(v)] += 1;
    }
    let Some(first) = hist.iter().position(|&c| c > 0) else {
        return Vec::new();
    };
    let total = src.len() as u32;
    if hist[first] == total {
        return src.to_vec();
    }
    let scale = 255.0f32 / (total - hist[first]) as f32;
    let mut lut = [0u8; 256];
    let mut sum = 0u32;
    for i in first + 1..256 {
        sum += hist[i];
        lut[i] = (sum as f32 * scale).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    src.iter().map(|&v| lut[usize::from(v)]).collect()
}
