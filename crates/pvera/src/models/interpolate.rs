//! Interpolation as torch computes it, shared by ViT and DINOv2: [`interpolate_bicubic`] (torch's CPU
//! bicubic kernel, bit for bit) and the position-embedding resize both families apply to inputs whose
//! patch grid differs from the stored one.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

const CUBIC_A: f32 = -0.75;

/// `((A + 2) x - (A + 3)) x x + 1` for |x| <= 1, rounded as torch's CPU build computes it.
fn cubic1(x: f32) -> f32 {
    let u = (CUBIC_A + 2.0).mul_add(x, -(CUBIC_A + 3.0));
    (u * x) * x + 1.0
}

/// `((A x - 5A) x + 8A) x - 4A` for 1 < |x| < 2, rounded as torch's CPU build computes it.
fn cubic2(x: f32) -> f32 {
    let u = CUBIC_A.mul_add(x, -(5.0 * CUBIC_A));
    let u = u.mul_add(x, 8.0 * CUBIC_A);
    u * x - 4.0 * CUBIC_A
}

/// For each output index: the four (clamped) source indices and their weights (computed in
/// f32, then stored in the tensor's dtype as torch stores them: `round` rounds them to it).
fn cubic_taps(input: usize, output: usize, round: fn(f32) -> f32) -> Vec<([usize; 4], [f32; 4])> {
    // area_pixel_compute_scale (no scale factor: input / output in f32), then
    // area_pixel_compute_source_index(cubic=true): scale * (i + 0.5) - 0.5, not clamped at 0.
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let real = scale.mul_add(i as f32 + 0.5, -0.5);
            // guard_index_and_lambda
            let idx = (real.floor() as i64).min(input as i64 - 1);
            let t = (real - idx as f32).clamp(0.0, 1.0);
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2((1.0 - t) + 1.0)].map(round);
            let mut ids = [0usize; 4];
            for (j, id) in ids.iter_mut().enumerate() {
                *id = (idx - 1 + j as i64).clamp(0, input as i64 - 1) as usize;
            }
            (ids, w)
        })
        .collect()
}

/// `x0 c0 + x1 c1 + x2 c2 + x3 c3` with the rounding of torch's compiled `cubic_interp1d`.
#[inline]
fn dot4(v: [f32; 4], w: &[f32; 4]) -> f32 {
    let acc = v[1] * w[1];
    let acc = v[0].mul_add(w[0], acc);
    let acc = v[2].mul_add(w[2], acc);
    v[3].mul_add(w[3], acc)
}

/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False)`
/// for (N, C, H, W) tensors: A = -0.75, source indices clamped at the borders, no antialiasing.
///
/// Computed in f32 on the host as torch's CPU kernel computes it (bit-exact with torch 2.x on
/// CPUs with FMA, i.e. its AVX2 / AVX-512 builds) and returned in `x`'s dtype and device. For
/// f16 / bf16 inputs torch keeps the interpolation weights in that dtype and accumulates in
/// f32; so does this (f64 inputs are computed in f32).
pub fn interpolate_bicubic(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if out_h == 0 || out_w == 0 || h == 0 || w == 0 {
        return Err(Error::Model(format!(
            "bicubic interpolation from {h}x{w} to {out_h}x{out_w}: every size must be positive"
        )));
    }
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let src: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let round: fn(f32) -> f32 = match x.dtype() {
        DType::BF16 => |v| half::bf16::from_f32(v).to_f32(),
        DType::F16 => |v| half::f16::from_f32(v).to_f32(),
        _ => |v| v,
    };
    let ry = cubic_taps(h, out_h, round);
    let rx = cubic_taps(w, out_w, round);
    let mut out = vec![0f32; n * c * out_h * out_w];
    for (plane, dst) in src.chunks_exact(h * w).zip(out.chunks_exact_mut(out_h * out_w)) {
        for (oy, (iy, wy)) in ry.iter().enumerate() {
            for (ox, (ix, wx)) in rx.iter().enumerate() {
                let mut rows = [0f32; 4];
                for (r, &yy) in rows.iter_mut().zip(iy) {
                    let row = &plane[yy * w..(yy + 1) * w];
                    *r = dot4([row[ix[0]], row[ix[1]], row[ix[2]], row[ix[3]]], wx);
                }
                dst[oy * out_w + ox] = dot4(rows, wy);
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, c, out_h, out_w), x.device())?.to_dtype(x.dtype())?)
}

/// transformers' `interpolate_pos_encoding` (ViT and DINOv2 share the rule): the stored table
/// (1, 1 + n², dim) as is when the patch count equals n² and the image is square, otherwise the
/// n x n grid resized bicubically (`align_corners=False`) to `rows` x `columns` after the class
/// position, in the table's dtype. `upcast`: resize in f32 and cast back (DINOv2) rather than
/// in the table's dtype (ViT; matters for f16 / bf16 tables, whose interpolation weights torch
/// rounds to that dtype).
pub(crate) fn interpolate_pos_encoding(
    pos: &Tensor,
    rows: usize,
    columns: usize,
    height: usize,
    width: usize,
    upcast: bool,
) -> Result<Tensor> {
    let (_, n1, dim) = pos.dims3()?;
    let num_positions = n1 - 1;
    if rows * columns == num_positions && height == width {
        return Ok(pos.clone());
    }
    let side = (num_positions as f64).sqrt() as usize;
    if side * side != num_positions {
        return Err(Error::Model(format!(
            "position_embeddings hold {num_positions} patch positions, not a square grid, so they cannot be \
             interpolated to a {rows}x{columns} patch grid; feed images of the configured image_size"
        )));
    }
    let class = pos.narrow(1, 0, 1)?;
    let grid = pos.narrow(1, 1, num_positions)?.reshape((1, side, side, dim))?.permute((0, 3, 1, 2))?;
    let resized = if upcast {
        interpolate_bicubic(&grid.to_dtype(DType::F32)?, rows, columns)?.to_dtype(pos.dtype())?
    } else {
        interpolate_bicubic(&grid, rows, columns)?
    };
    let resized = resized.permute((0, 2, 3, 1))?.reshape((1, rows * columns, dim))?;
    Ok(Tensor::cat(&[class, resized], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cubic_weights_sum_to_one_and_identity_is_exact() {
        for (i, o) in [(4, 5), (37, 16), (5, 3), (7, 11)] {
            for (_, w) in cubic_taps(i, o, |v| v) {
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{w:?}");
            }
        }
        for (ids, w) in cubic_taps(6, 6, |v| v) {
            assert_eq!(w, [0.0, 1.0, 0.0, 0.0]);
            assert!(ids[1] < 6);
        }
    }

    #[test]
    fn bicubic_keeps_constants_and_shapes() {
        let x = Tensor::full(2.5f32, (1, 3, 4, 4), &Device::Cpu).unwrap();
        let y = interpolate_bicubic(&x, 7, 3).unwrap();
        assert_eq!(y.dims(), &[1, 3, 7, 3]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|a| (a - 2.5).abs() < 1e-5), "{v:?}");
        assert!(interpolate_bicubic(&x, 0, 3).is_err());
    }
}
