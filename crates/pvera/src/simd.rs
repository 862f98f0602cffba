//! Vectorised f32 math for the elementwise hot paths (GELU, softmax).
//!
//! The kernels are plain loops over fixed-width lanes that the compiler turns into SIMD code;
//! each public entry point picks, once per process, an instantiation compiled for AVX-512F,
//! AVX2 + FMA, or the build's baseline (`is_x86_feature_detected!`). All instantiations use
//! fused multiply-adds in the same places, so they return the same bits on every x86 CPU.
//!
//! - [`exp`]: Cephes' single-precision `expf` (range reduction by `ln 2` in two parts and a
//!   degree-7 polynomial), within 2 ulp of the correctly rounded result where that is a normal
//!   number; subnormal results down to `e^-103.97`, 0 below; `exp(-inf) = 0`, `exp(+inf) = inf`,
//!   NaN stays NaN.
//! - [`erf`]: a rational approximation (Abramowitz & Stegun 7.1.26: `1 − t·P(t)·exp(−x²)`, `t = 1/(1 + 0.3275911|x|)`,
//!   absolute error 1.5e-7 in exact arithmetic, below 6e-7 in f32): cheap to vectorise and, in
//!   GELU, closer to the exact function than PyTorch's own CPU `gelu` (1.2e-6 on [-6, 6]).

/// Lanes per block: one AVX-512 register, two AVX2 registers.
const W: usize = 16;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_HI: f32 = 88.722_84;
const EXP_LO: f32 = -103.972_08;

/// `e^x` (see the module docs for accuracy and special values).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    // max/min (not clamp) so that NaN becomes a finite value here; it is restored below.
    let xc = x.max(EXP_LO).min(EXP_HI);
    // Round to the nearest integer by adding 1.5·2^23 (ties to even, as the FPU rounds); the
    // integer is in the low mantissa bits. Branch-free and vectorisable, unlike `as i32`.
    const MAGIC: f32 = 12_582_912.0;
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    // 2^n for n in [-150, 128] as two factors 2^(n/2) · 2^(n − n/2), each a normal number
    // (so n = 128 and results in the subnormal range come out right).
    let n1 = ni >> 1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - n1 + 127) as u32) << 23);
    let v = y * s1 * s2;
    if x > EXP_HI {
        f32::INFINITY
    } else if x < EXP_LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// `erf(x)` as ATen's vectorised kernels compute it (see the module docs).
#[inline(always)]
fn erf1(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let mut r = 1.061_405_4f32;
    r = r.mul_add(t, -1.453_152);
    r = r.mul_add(t, 1.421_413_8);
    r = r.mul_add(t, -0.284_496_74);
    r = r.mul_add(t, 0.254_829_6);
    let e = exp1(-(x * x));
    let y = (-e * t).mul_add(r, 1.0);
    if x.is_nan() {
        x
    } else {
        y.copysign(x)
    }
}

const SQRT1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/sqrt(2π)`: the standard normal density's constant (ATen's `M_2_SQRTPI · M_SQRT1_2 · 0.5`).
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu1(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf1(x * SQRT1_2))
}

#[inline(always)]
fn gelu_grad1(x: f32, g: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf1(x * SQRT1_2));
    let pdf = INV_SQRT_2PI * exp1(-0.5 * x * x);
    g * x.mul_add(pdf, cdf)
}

/// Applies `f` to whole blocks of `W` lanes (vectorised), then to the tail.
#[cfg(test)]
#[inline(always)]
fn map_blocks(src: &[f32], dst: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let mut sb = src.chunks_exact(W);
    let mut db = dst.chunks_exact_mut(W);
    for (s, d) in (&mut sb).zip(&mut db) {
        let s: &[f32; W] = s.try_into().unwrap_or(&[0.0; W]);
        let mut o = [0f32; W];
        for i in 0..W {
            o[i] = f(s[i]);
        }
        d.copy_from_slice(&o);
    }
    for (s, d) in sb.remainder().iter().zip(db.into_remainder()) {
        *d = f(*s);
    }
}

#[inline(always)]
fn zip_blocks(a: &[f32], b: &[f32], dst: &mut [f32], f: impl Fn(f32, f32) -> f32 + Copy) {
    let n = a.len().min(b.len()).min(dst.len());
    let (a, b, dst) = (&a[..n], &b[..n], &mut dst[..n]);
    let mut ab = a.chunks_exact(W);
    let mut bb = b.chunks_exact(W);
    let mut db = dst.chunks_exact_mut(W);
    for ((x, y), d) in (&mut ab).zip(&mut bb).zip(&mut db) {
        let x: &[f32; W] = x.try_into().unwrap_or(&[0.0; W]);
        let y: &[f32; W] = y.try_into().unwrap_or(&[0.0; W]);
        let mut o = [0f32; W];
        for i in 0..W {
            o[i] = f(x[i], y[i]);
        }
        d.copy_from_slice(&o);
    }
    for ((x, y), d) in ab.remainder().iter().zip(bb.remainder()).zip(db.into_remainder()) {
        *d = f(*x, *y);
    }
}

/// In place: `a[i] = f(a[i], b[i])` (a plain zipped loop, which the compiler vectorises over
/// contiguous lanes).
#[inline(always)]
fn zip_in_place(a: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Copy) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = f(*x, *y);
    }
}

/// In place: `row = exp(row − max(row))`, returns the row's sum (in f32, lane-wise partial sums
/// added in a fixed order).
#[inline(always)]
fn softmax_exp_row(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; W];
    let mut blocks = row.chunks_exact(W);
    for b in &mut blocks {
        for i in 0..W {
            lanes[i] = lanes[i].max(b[i]);
        }
    }
    let mut max = blocks.remainder().iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    for l in lanes {
        max = max.max(l);
    }
    if max == f32::NEG_INFINITY {
        // Every entry masked out: torch gives NaN for a row of -inf; keep that (0/0).
        max = 0.0;
    }
    let mut acc = [0f32; W];
    let mut blocks = row.chunks_exact_mut(W);
    for b in &mut blocks {
        for i in 0..W {
            let e = exp1(b[i] - max);
            b[i] = e;
            acc[i] += e;
        }
    }
    let mut sum = 0f32;
    for e in blocks.into_remainder() {
        *e = exp1(*e - max);
        sum += *e;
    }
    acc.iter().sum::<f32>() + sum
}

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? => $body:expr) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { $body }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { $body }
                match level() {
                    // SAFETY: `level()` reported these features on this CPU.
                    Level::V4 => return unsafe { v4($($arg),*) },
                    Level::V3 => return unsafe { v3($($arg),*) },
                    Level::Base => {}
                }
            }
            $body
        }
    };
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    V4,
    V3,
    Base,
}

/// Tests only: run every kernel at this level instead of the detected one (0 = detected).
#[cfg(all(test, target_arch = "x86_64"))]
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    #[cfg(test)]
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return Level::V4,
        2 => return Level::V3,
        3 => return Level::Base,
        _ => {}
    }
    detected_level()
}

#[cfg(target_arch = "x86_64")]
fn detected_level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            Level::V4
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            Level::V3
        } else {
            Level::Base
        }
    })
}

dispatch! {
    /// `dst[i] = gelu(src[i])` (erf form; called directly by the tests).
    #[cfg(test)]
    pub fn gelu(src: &[f32], dst: &mut [f32]) => map_blocks(src, dst, gelu1)
}

dispatch! {
    /// In place: `x[i] = gelu(x[i])`.
    pub fn gelu_in_place(x: &mut [f32]) => {
        for v in x.iter_mut() {
            *v = gelu1(*v);
        }
    }
}

dispatch! {
    /// The reparametrisation of PVeRA's latent over rows, in place over `z` (`n × r`, holding
    /// ε on entry): with `h` the rows of `A·x` (`n × 2r`, mean half first) and `ld` = λ_d (2r),
    /// `mu = h[..r] ⊙ ld[..r]`, `logvar = h[r..] ⊙ ld[r..]`, `z = mu + ε ⊙ exp(0.5 · logvar)`
    /// (PEFT's order of operations). Returns how many log-variances are above `limit` or NaN.
    pub fn reparam_rows(h: &[f32], ld: &[f32], z: &mut [f32], r: usize, limit: f32) -> usize => {
        let (ldm, ldv) = ld.split_at(r);
        let mut over = 0usize;
        for (hr, zr) in h.chunks_exact(2 * r).zip(z.chunks_exact_mut(r)) {
            let (hm, hv) = hr.split_at(r);
            let mut bad = 0u32;
            for j in 0..r {
                let lv = hv[j] * ldv[j];
                bad += u32::from(!(lv <= limit));
                let t = zr[j] * exp1(lv * 0.5);
                zr[j] = hm[j] * ldm[j] + t;
            }
            over += bad as usize;
        }
        over
    }
}

dispatch! {
    /// Backward of [`reparam_rows`] over rows: with `gz` = ∂L/∂z (`n × r`), writes ∂L/∂h
    /// (`n × 2r`, before λ_d) into `dh` and adds ∂L/∂λ_d (2r) into `acc`.
    pub fn reparam_grad_rows(h: &[f32], ld: &[f32], gz: &[f32], eps: &[f32], dh: &mut [f32], acc: &mut [f32], r: usize) => {
        let (ldm, ldv) = ld.split_at(r);
        let (am, av) = acc.split_at_mut(r);
        for (((hr, gr), er), dr) in h.chunks_exact(2 * r).zip(gz.chunks_exact(r)).zip(eps.chunks_exact(r)).zip(dh.chunks_exact_mut(2 * r)) {
            let (hm, hv) = hr.split_at(r);
            let (dm, dv) = dr.split_at_mut(r);
            for j in 0..r {
                let std = exp1(hv[j] * ldv[j] * 0.5);
                let t = gr[j] * er[j] * std * 0.5;
                dm[j] = gr[j] * ldm[j];
                am[j] += gr[j] * hm[j];
                dv[j] = t * ldv[j];
                av[j] += t * hv[j];
            }
        }
    }
}

dispatch! {
    /// `dst[i] = grad[i] · gelu'(x[i])`.
    pub fn gelu_grad(x: &[f32], grad: &[f32], dst: &mut [f32]) => zip_blocks(x, grad, dst, gelu_grad1)
}

dispatch! {
    /// `dst[i] = e^src[i]` (the kernel inside softmax and erf; called directly by the tests).
    #[cfg(test)]
    pub fn exp(src: &[f32], dst: &mut [f32]) => map_blocks(src, dst, exp1)
}

dispatch! {
    /// `dst[i] = erf(src[i])` (the kernel inside GELU; called directly by the tests).
    #[cfg(test)]
    pub fn erf(src: &[f32], dst: &mut [f32]) => map_blocks(src, dst, erf1)
}

dispatch! {
    /// In place over rows of width `d`: `row = softmax(row · scale + mask)`; `mask` (width `d`),
    /// when given, is added to every row.
    pub fn softmax_rows(data: &mut [f32], d: usize, scale: f32, mask: Option<&[f32]>) => {
        for row in data.chunks_mut(d.max(1)) {
            // `x · scale + m` rounds once; `x · scale` alone equals it for m = 0, so an all-zero
            // mask gives exactly the unmasked result.
            match mask {
                Some(m) => zip_in_place(row, m, |x, m| x.mul_add(scale, m)),
                None if scale != 1.0 => row.iter_mut().for_each(|x| *x *= scale),
                None => {}
            }
            let sum = softmax_exp_row(row);
            let inv = 1.0 / sum;
            for y in row.iter_mut() {
                *y *= inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_and_handles_special_values() {
        let xs: Vec<f32> = (0..200_001).map(|i| -87.0 + i as f32 * (175.5 / 200_000.0)).collect();
        let mut ys = vec![0f32; xs.len()];
        exp(&xs, &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let want = (*x as f64).exp() as f32;
            assert!(ulps(*y, want) <= 2, "exp({x}) = {y}, want {want}");
        }
        let sp = [f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -200.0, 200.0, 0.0];
        let mut o = [0f32; 6];
        exp(&sp, &mut o);
        assert_eq!(o[0], 0.0);
        assert_eq!(o[1], f32::INFINITY);
        assert!(o[2].is_nan());
        assert_eq!(o[3], 0.0);
        assert_eq!(o[4], f32::INFINITY);
        assert_eq!(o[5], 1.0);
    }

    #[test]
    fn erf_and_gelu_stay_within_the_approximation_error() {
        let xs: Vec<f32> = (0..100_001).map(|i| -12.0 + i as f32 * (24.0 / 100_000.0)).collect();
        let mut e = vec![0f32; xs.len()];
        erf(&xs, &mut e);
        let mut g = vec![0f32; xs.len()];
        gelu(&xs, &mut g);
        for ((x, e), g) in xs.iter().zip(&e).zip(&g) {
            let want = statrs::function::erf::erf(*x as f64);
            assert!((*e as f64 - want).abs() < 6e-7, "erf({x}) = {e}, want {want}");
            let gw = *x as f64 * 0.5 * (1.0 + statrs::function::erf::erf(*x as f64 / 2f64.sqrt()));
            assert!((*g as f64 - gw).abs() < 2e-6 * (1.0 + gw.abs()), "gelu({x}) = {g}, want {gw}");
        }
        // torch: gelu(-inf) = NaN, gelu(-30) = -0 (its gelu(+inf) = NaN; here the limit, +inf).
        let mut o = [0f32; 4];
        gelu(&[f32::NEG_INFINITY, f32::INFINITY, f32::NAN, -30.0], &mut o);
        assert!(o[0].is_nan());
        assert_eq!(o[1], f32::INFINITY);
        assert!(o[2].is_nan());
        assert_eq!(o[3].to_bits(), (-0f32).to_bits());
    }

    #[test]
    fn gelu_gradient_matches_the_analytic_derivative() {
        let xs: Vec<f32> = (0..4001).map(|i| -10.0 + i as f32 * 0.005).collect();
        let gs: Vec<f32> = xs.iter().map(|x| 1.0 + 0.1 * x).collect();
        let mut d = vec![0f32; xs.len()];
        gelu_grad(&xs, &gs, &mut d);
        for ((x, g), d) in xs.iter().zip(&gs).zip(&d) {
            let x64 = *x as f64;
            let cdf = 0.5 * (1.0 + statrs::function::erf::erf(x64 / 2f64.sqrt()));
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let want = *g as f64 * (cdf + x64 * pdf);
            assert!((*d as f64 - want).abs() < 2e-6 * (1.0 + want.abs()), "gelu'({x}) = {d}, want {want}");
        }
    }

    /// The AVX-512, AVX2 + FMA and baseline builds of every kernel give the same bits (on the
    /// levels this CPU has; the baseline always runs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_instantiation_returns_the_same_bits() {
        use std::sync::atomic::Ordering;
        let xs: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0131).collect();
        let gs: Vec<f32> = xs.iter().map(|x| 0.5 - 0.07 * x).collect();
        let run = || {
            let mut e = vec![0f32; xs.len()];
            exp(&xs, &mut e);
            let mut g = xs.clone();
            gelu_in_place(&mut g);
            let mut d = vec![0f32; xs.len()];
            gelu_grad(&xs, &gs, &mut d);
            let mut sm = xs[..37 * 110].to_vec();
            softmax_rows(&mut sm, 37, 0.7, Some(&gs[..37]));
            let r = 8;
            let mut z = gs[..40 * r].to_vec();
            let over = reparam_rows(&xs[..40 * 2 * r], &gs[..2 * r], &mut z, r, 88.0);
            let mut dh = vec![0f32; 40 * 2 * r];
            let mut acc = vec![0f32; 2 * r];
            reparam_grad_rows(&xs[..40 * 2 * r], &gs[..2 * r], &gs[..40 * r], &xs[..40 * r], &mut dh, &mut acc, r);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (bits(&e), bits(&g), bits(&d), bits(&sm), bits(&z), over, bits(&dh), bits(&acc))
        };
        let mut levels = vec![3u8];
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            levels.push(2);
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            levels.push(1);
        }
        let mut results = Vec::new();
        for l in &levels {
            FORCED.store(*l, Ordering::Relaxed);
            results.push(run());
        }
        FORCED.store(0, Ordering::Relaxed);
        for (l, r) in levels.iter().zip(&results).skip(1) {
            assert!(*r == results[0], "level {l} differs from the baseline");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_f64() {
        let d = 37;
        let mut v: Vec<f32> = (0..5 * d).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
        v[3] = f32::NEG_INFINITY; // a masked entry
        let orig = v.clone();
        softmax_rows(&mut v, d, 0.5, None);
        for (row, src) in v.chunks(d).zip(orig.chunks(d)) {
            let m = src.iter().map(|x| (*x as f64) * 0.5).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = src.iter().map(|x| ((*x as f64) * 0.5 - m).exp()).sum();
            for (p, x) in row.iter().zip(src) {
                let want = ((*x as f64) * 0.5 - m).exp() / s;
                assert!((*p as f64 - want).abs() < 1e-6 * (want + 1e-3), "{p} vs {want}");
            }
        }
        assert_eq!(v[3], 0.0);
    }
}
