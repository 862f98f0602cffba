//! Custom ops for the hot paths.
//!
//! [`matmul_const`]: `x @ rhs` where `rhs` is frozen (a base weight, the shared projections).
//! candle's `matmul` backward always computes both operands' gradients, so every frozen base
//! layer would pay a weight-gradient GEMM (`xᵀ · grad`, as expensive as its forward) in each
//! training step, only for the result to be dropped. This op runs candle's own CPU GEMM in the
//! forward pass (bit-identical results) and returns only the input gradient `grad · rhsᵀ`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::error::Result;

/// `x (m, k) @ rhs (k, n)` with no gradient for `rhs` (see the module docs). `rhs` may be a
/// strided view (e.g. `w.t()`). Falls back to `Tensor::matmul` off the CPU, for ranks other
/// than 2, and when `x` tracks no gradient (inference), where both are the same GEMM.
pub fn matmul_const(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if !x.track_op() || !x.device().is_cpu() || x.rank() != 2 || rhs.rank() != 2 || x.dtype() != rhs.dtype() {
        return Ok(x.matmul(rhs)?);
    }
    Ok(x.apply_op1(ConstMatmul { rhs: rhs.clone() })?)
}

struct ConstMatmul {
    rhs: Tensor,
}

impl CustomOp1 for ConstMatmul {
    fn name(&self) -> &'static str {
        "pvera-const-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = self.rhs.dims2()?;
        if k != k2 {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: layout.shape().clone(),
                rhs: self.rhs.shape().clone(),
                op: "const-matmul",
            });
        }
        let (rs, rl) = self.rhs.storage_and_layout();
        let Storage::Cpu(rs) = &*rs else {
            return Err(candle_core::Error::Msg("const-matmul: the frozen operand is not on the CPU".into()));
        };
        // The same call `Tensor::matmul` makes for 2-D operands.
        let out = storage.matmul(rs, (1, m, n, k), layout, rl)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.rhs.t()?)?))
    }
}

/// Softmax over the last dimension of an f32 CPU tensor as one pass per row, with its own
/// backward (`p ⊙ (g − Σ g ⊙ p)`). The forward is bit-identical to the composite candle ops it
/// replaces (max, `exp(x − max)`, candle's row sum kernel, division), which needed five full
/// passes over the attention scores forward and more backward. `None` when the op does not
/// apply (another device or dtype), so callers keep the composite.
pub fn softmax_last_dim_f32(x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || x.rank() == 0 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(Some(x.apply_op1(SoftmaxLastDim)?))
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "pvera-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::cpu::kernels::VecOps;
        use rayon::prelude::*;
        let src = storage.as_slice::<f32>()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("softmax: input must be contiguous".into()));
        };
        let src = &src[o1..o2];
        let dims = layout.shape().dims();
        let d = dims[dims.len() - 1].max(1);
        let mut dst = vec![0f32; src.len()];
        let rows_per_task = (4096 / d).max(1);
        src.par_chunks(d * rows_per_task).zip(dst.par_chunks_mut(d * rows_per_task)).for_each(|(s, o)| {
            for (s, o) in s.chunks(d).zip(o.chunks_mut(d)) {
                let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (x, y) in s.iter().zip(o.iter_mut()) {
                    *y = (*x - max).exp();
                }
                let mut sum = 0f32;
                // SAFETY: `o` holds `o.len()` initialised f32 values.
                unsafe { f32::vec_reduce_sum(o.as_ptr(), &mut sum, o.len()) };
                for y in o.iter_mut() {
                    *y /= sum;
                }
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gp = (grad_res * res)?;
        let s = gp.sum_keepdim(candle_core::D::Minus1)?;
        Ok(Some((gp - res.broadcast_mul(&s)?)?))
    }
}

/// `LayerNorm` over the last dimension of an f32 CPU tensor with frozen `weight` and `bias`, as
/// one pass per row with its own backward (the input gradient only). The forward is
/// bit-identical to the composite it replaces (`mean_keepdim`, centring, `mean(xc²)`,
/// `sqrt(var + eps)`, division, scale, shift: ten full passes forward, more backward). `None`
/// when the op does not apply (another device or dtype, trainable weight or bias).
pub fn layer_norm_f32(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Option<Tensor>> {
    let d = match x.dims().last() {
        Some(&d) if d > 0 => d,
        _ => return Ok(None),
    };
    let frozen = |t: &Tensor| !t.track_op() && t.dtype() == candle_core::DType::F32 && t.dims() == [d];
    if !x.device().is_cpu()
        || x.dtype() != candle_core::DType::F32
        || !frozen(weight)
        || !bias.is_none_or(frozen)
    {
        return Ok(None);
    }
    let w = weight.to_vec1::<f32>()?;
    let b = match bias {
        Some(b) => b.to_vec1::<f32>()?,
        None => vec![0f32; d],
    };
    let x = x.contiguous()?;
    Ok(Some(x.apply_op1(LayerNormOp { w, b, has_bias: bias.is_some(), eps })?))
}

struct LayerNormOp {
    w: Vec<f32>,
    b: Vec<f32>,
    has_bias: bool,
    eps: f64,
}

/// Rows per parallel task for rows of width `d`.
fn rows_per_task(d: usize) -> usize {
    (8192 / d.max(1)).max(1)
}

/// The composite's mean: candle's row sum, then `affine(1/n, 0)` in f32.
fn row_mean(row: &[f32]) -> f32 {
    use candle_core::cpu::kernels::VecOps;
    let mut sum = 0f32;
    // SAFETY: `row` holds `row.len()` initialised f32 values.
    unsafe { f32::vec_reduce_sum(row.as_ptr(), &mut sum, row.len()) };
    sum * ((1f64 / row.len() as f64) as f32) + 0f32
}

impl LayerNormOp {
    /// Centred row into `xc`; returns `sqrt(var + eps)`.
    fn centre(&self, s: &[f32], xc: &mut [f32]) -> f32 {
        let mean = row_mean(s);
        for (x, c) in s.iter().zip(xc.iter_mut()) {
            *c = *x - mean;
        }
        let sq: Vec<f32> = xc.iter().map(|c| c * c).collect();
        let var = row_mean(&sq);
        (var * 1f32 + self.eps as f32).sqrt()
    }
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "pvera-layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = storage.as_slice::<f32>()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("layer norm: input must be contiguous".into()));
        };
        let src = &src[o1..o2];
        let d = self.w.len();
        let mut dst = vec![0f32; src.len()];
        let k = rows_per_task(d) * d;
        src.par_chunks(k).zip(dst.par_chunks_mut(k)).for_each(|(s, o)| {
            for (s, o) in s.chunks(d).zip(o.chunks_mut(d)) {
                let std = self.centre(s, o);
                for ((y, w), b) in o.iter_mut().zip(&self.w).zip(&self.b) {
                    let v = (*y / std) * w;
                    *y = if self.has_bias { v + b } else { v };
                }
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    /// `dx = (g' − mean(g') − x̂ · mean(g' ⊙ x̂)) / std` with `g' = g ⊙ w`, `x̂ = (x − mean) / std`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let d = self.w.len();
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_dtype(candle_core::DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; x.len()];
        let k = rows_per_task(d) * d;
        dx.par_chunks_mut(k).zip(x.par_chunks(k)).zip(g.par_chunks(k)).for_each(|((dx, x), g)| {
            let mut gw = vec![0f32; d];
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let std = self.centre(x, dx); // dx holds x − mean
                let inv = 1.0 / std;
                let (mut m1, mut m2) = (0f64, 0f64);
                for i in 0..d {
                    gw[i] = g[i] * self.w[i];
                    dx[i] *= inv; // x̂
                    m1 += gw[i] as f64;
                    m2 += (gw[i] * dx[i]) as f64;
                }
                let (m1, m2) = ((m1 / d as f64) as f32, (m2 / d as f64) as f32);
                for i in 0..d {
                    dx[i] = (gw[i] - m1 - dx[i] * m2) * inv;
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn const_matmul_matches_matmul_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let xv: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let wv: Vec<f32> = (0..12).map(|i| (i as f32 * 0.91).cos()).collect();
        let x = Var::from_vec(xv, (5, 3), &dev).unwrap();
        let w = Tensor::from_vec(wv, (4, 3), &dev).unwrap(); // (out, in): x · wᵀ
        let y_ref = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let y = matmul_const(x.as_tensor(), &w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), y_ref.to_vec2::<f32>().unwrap(), "bit-identical forward");
        let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let a = g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let b = g_ref.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b, "same input gradient");
        assert!(g.get(&w).is_none(), "no gradient for the frozen operand");
    }

    fn composite_softmax(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(candle_core::D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        let s = e.sum_keepdim(candle_core::D::Minus1).unwrap();
        e.broadcast_div(&s).unwrap()
    }

    fn composite_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(candle_core::D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(candle_core::D::Minus1).unwrap();
        let y = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        y.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    #[test]
    fn layer_norm_is_bit_identical_to_the_composite_and_has_the_same_gradient() {
        let dev = Device::Cpu;
        let d = 37;
        let v: Vec<f32> = (0..4 * 3 * d).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
        let x = Var::from_vec(v, (4, 3, d), &dev).unwrap();
        let w = Tensor::from_vec((0..d).map(|i| 0.5 + i as f32 * 0.03).collect::<Vec<_>>(), d, &dev).unwrap();
        let b = Tensor::from_vec((0..d).map(|i| i as f32 * -0.01).collect::<Vec<_>>(), d, &dev).unwrap();
        let up: Vec<f32> = (0..4 * 3 * d).map(|i| ((i * 31) % 17) as f32 * 0.01 - 0.05).collect();
        let up = Tensor::from_vec(up, (4, 3, d), &dev).unwrap();
        let a = layer_norm_f32(x.as_tensor(), &w, Some(&b), 1e-12).unwrap().unwrap();
        let c = composite_layer_norm(x.as_tensor(), &w, &b, 1e-12);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = ga.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gc = gc.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in ga.iter().zip(&gc) {
            assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }

    #[test]
    fn softmax_is_bit_identical_to_the_composite_and_has_the_same_gradient() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..3 * 5 * 37).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
        let x = Var::from_vec(v, (3, 5, 37), &dev).unwrap();
        let w: Vec<f32> = (0..3 * 5 * 37).map(|i| ((i * 31) % 17) as f32 * 0.01).collect();
        let w = Tensor::from_vec(w, (3, 5, 37), &dev).unwrap();
        let a = softmax_last_dim_f32(x.as_tensor()).unwrap().unwrap();
        let b = composite_softmax(x.as_tensor());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = ga.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gb = gb.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }
}
