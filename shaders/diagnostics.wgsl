// Stream diagnostics of method auto (runtime/src/adapt/methods/auto.rs), computed on the GPU in
// the pass that made the predictions: a batch's label-correlation histogram, collapse scores and
// agreement with the source model come back as one block of 2C + 4 values, not as B×C
// probabilities for the host to reduce.
//
// batch_stats runs in ONE workgroup (fixed-order sums: bit-identical run to run) over B rows of C
// values. A row's probabilities p are, by `mode`:
//   0: the softmax of the row's logits (a row holding a NaN or a +inf, or only -inf, has none:
//      NaN throughout, as the host's softmax makes it);
//   1: the row as it is (an output stage's probabilities);
//   2: the softmax re-weighted by `weights` and renormalised, p·q / Σ p·q (label-shift
//      correction; a row whose product does not sum to a finite value > 0 keeps p).
// A row's top-1 class is the first maximum of p (a NaN never ranks: a row of NaN is class 0);
// mode 0 decides it on the logits, whose order the softmax keeps. With `compare` = 0 the rows'
// top-1 classes are written to `reference` (the source model's, for later passes to compare
// with); with 1 they are compared with it. Output:
//   [top-1 histogram (C) | mean probability (C) | H(mean)/ln C | mean row entropy/ln C |
//    share of rows agreeing with `reference` | share of the top class | scratch (4B)]
// Entropies skip p that are not > 0 (and NaN), as the host's do.

const WG: u32 = 256u;

struct StatsParams {
    b: u32,
    c: u32,
    mode: u32,
    compare: u32,
}

// Staged through workgroup memory (see runtime/src/gpu/params.rs).
@group(0) @binding(0) var<uniform> dp_in: StatsParams;
var<workgroup> dp: StatsParams;
@group(0) @binding(1) var<storage, read> rows: array<f32>;
// mode 2: q (C); otherwise unused (any buffer).
@group(0) @binding(2) var<storage, read> weights: array<f32>;
// top-1 class per row, as f32 (B)
@group(0) @binding(3) var<storage, read_write> reference: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 256>;

fn is_nan(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// Fixed-order tree sum (op 0) or maximum (op 1) over the workgroup; uniform control flow.
fn wg_reduce(t: u32, v: f32, op: u32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red[t] = select(red[t] + red[t + s], max(red[t], red[t + s]), op == 1u);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Scratch per row after the head: [row max (B), Σ exp (B), Σ p·q or 0 (B), top-1 (B)].
fn scratch(q: u32, i: u32) -> u32 {
    return 2u * dp.c + 4u + q * dp.b + i;
}

fn entropy_term(v: f32) -> f32 {
    if v > 0.0 && !is_nan(v) {
        return v * log(v);
    }
    return 0.0;
}

// p[i][k] from the row's scratch (modes 0 and 2) or the row itself (mode 1).
fn prob(i: u32, k: u32) -> f32 {
    let x = rows[i * dp.c + k];
    if dp.mode == 1u {
        return x;
    }
    let s = out[scratch(1u, i)];
    if is_nan(s) {
        return nan();
    }
    var v = exp(x - out[scratch(0u, i)]) / s;
    let w = out[scratch(2u, i)];
    if dp.mode == 2u && w != 0.0 {
        v = v * weights[k] / w;
    }
    return v;
}

@compute @workgroup_size(256)
fn batch_stats(@builtin(local_invocation_index) t: u32) {
    if t == 0u {
        dp = dp_in;
    }
    workgroupBarrier();
    let b = dp.b;
    let c = dp.c;
    var row_entropy = 0.0;
    var agree = 0.0;
    for (var i = t; i < b; i += WG) {
        let base = i * c;
        if dp.mode != 1u {
            // The row's maximum (NaN skipped, as f32::max does), whether it has probabilities.
            var m = -3.40282347e38;
            var bad = false;
            var any = false;
            for (var k = 0u; k < c; k++) {
                let x = rows[base + k];
                if is_nan(x) {
                    bad = true;
                } else if !any || x > m {
                    m = x;
                    any = true;
                }
            }
            bad = bad || !any || !is_finite(m);
            var s = 0.0;
            for (var k = 0u; k < c; k++) {
                s += exp(rows[base + k] - m);
            }
            out[scratch(0u, i)] = m;
            out[scratch(1u, i)] = select(s, nan(), bad);
            var w = 0.0;
            if dp.mode == 2u && !bad {
                for (var k = 0u; k < c; k++) {
                    w += exp(rows[base + k] - m) / s * weights[k];
                }
                if !(w > 0.0 && is_finite(w)) {
                    w = 0.0;
                }
            }
            out[scratch(2u, i)] = w;
        }
        var best = 0u;
        var bv = 0.0;
        var h = 0.0;
        for (var k = 0u; k < c; k++) {
            let v = prob(i, k);
            // mode 0 ranks the logits (the softmax keeps their order; f32 exp can tie them).
            let r = select(v, rows[base + k], dp.mode == 0u);
            if k == 0u {
                bv = r;
            } else if !is_nan(r) && !is_nan(bv) && r > bv {
                bv = r;
                best = k;
            }
            h -= entropy_term(v);
        }
        if dp.mode == 0u && is_nan(out[scratch(1u, i)]) {
            best = 0u;
        }
        out[scratch(3u, i)] = f32(best);
        if dp.compare == 0u {
            reference[i] = f32(best);
        } else if reference[i] == f32(best) {
            agree += 1.0;
        }
        row_entropy += h;
    }
    let row_total = wg_reduce(t, row_entropy, 0u);
    let agree_total = wg_reduce(t, agree, 0u);
    // Every row's scratch is written before any class reads it.
    storageBarrier();
    var mean_entropy = 0.0;
    var top = 0.0;
    for (var k = t; k < c; k += WG) {
        var count = 0.0;
        var mean = 0.0;
        for (var i = 0u; i < b; i++) {
            count += select(0.0, 1.0, out[scratch(3u, i)] == f32(k));
            mean += prob(i, k) / f32(b);
        }
        out[k] = count;
        out[c + k] = mean;
        mean_entropy -= entropy_term(mean);
        top = max(top, count);
    }
    let mean_total = wg_reduce(t, mean_entropy, 0u);
    let top_count = wg_reduce(t, top, 1u);
    if t == 0u {
        let ln_c = log(f32(c));
        let n = f32(max(b, 1u));
        out[2u * c] = select(1.0, mean_total / ln_c, c > 1u);
        out[2u * c + 1u] = select(0.0, row_total / f32(b) / ln_c, c > 1u && b > 0u);
        out[2u * c + 2u] = agree_total / n;
        out[2u * c + 3u] = top_count / n;
    }
}
