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

/// `x (m, k) @ rhs (k, n) + bias` with frozen `rhs` and `bias` (a base layer's weight and bias)
/// on f32 CPU tensors: the output starts as the bias rows and the GEMM accumulates into it, which
/// saves the zero fill and the separate broadcast-add pass over the output. Backward as
/// [`matmul_const`] (the input gradient only). Falls back to `matmul_const` + `broadcast_add`
/// where it does not apply (another device or dtype, a bias that needs a gradient, ranks other
/// than 2).
pub fn matmul_bias_const(x: &Tensor, rhs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let applies = f32_cpu(x)
        && f32_cpu(rhs)
        && x.rank() == 2
        && rhs.rank() == 2
        && !rhs.track_op()
        && bias.is_none_or(|b| f32_cpu(b) && !b.track_op() && b.dims() == [rhs.dims()[1]]);
    if !applies {
        let y = matmul_const(x, rhs)?;
        return Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        });
    }
    let bias = match bias {
        Some(b) => Some(b.to_vec1::<f32>()?),
        None => None,
    };
    Ok(x.apply_op1(BiasMatmul { rhs: rhs.clone(), bias })?)
}

struct BiasMatmul {
    rhs: Tensor,
    bias: Option<Vec<f32>>,
}

impl CustomOp1 for BiasMatmul {
    fn name(&self) -> &'static str {
        "pvera-bias-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k2, n) = self.rhs.dims2()?;
        if k != k2 {
            return Err(candle_core::Error::ShapeMismatchBinaryOp {
                lhs: layout.shape().clone(),
                rhs: self.rhs.shape().clone(),
                op: "bias-matmul",
            });
        }
        let (rs, rl) = self.rhs.storage_and_layout();
        let Storage::Cpu(rs) = &*rs else {
            return Err(candle_core::Error::Msg("bias-matmul: the frozen operand is not on the CPU".into()));
        };
        let lhs = &storage.as_slice::<f32>()?[layout.start_offset()..];
        let rhs = &rs.as_slice::<f32>()?[rl.start_offset()..];
        let (ls, rst) = (layout.stride(), rl.stride());
        // The last element each operand's strides reach must lie inside its buffer.
        let reach = |rows: usize, cols: usize, s: &[usize]| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1) * s[0] + (cols - 1) * s[1] + 1
            }
        };
        if reach(m, k, ls) > lhs.len() || reach(k, n, rst) > rhs.len() {
            return Err(candle_core::Error::Msg("bias-matmul: operand strides exceed the storage".into()));
        }
        let mut dst = match &self.bias {
            Some(b) => {
                let mut d = Vec::with_capacity(m * n);
                for _ in 0..m {
                    d.extend_from_slice(b);
                }
                d
            }
            None => vec![0f32; m * n],
        };
        if m > 0 && n > 0 {
            let threads = candle_core::utils::get_num_threads();
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            // SAFETY: dst is a contiguous (m, n) buffer; lhs and rhs cover every element their
            // strides address (checked above). dst := 1·dst + 1·lhs·rhs.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    lhs.as_ptr(),
                    ls[1] as isize,
                    ls[0] as isize,
                    rhs.as_ptr(),
                    rst[1] as isize,
                    rst[0] as isize,
                    1f32,
                    1f32,
                    false,
                    false,
                    false,
                    par,
                )
            };
        }
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.rhs.t()?)?))
    }
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

/// Softmax over the last dimension of an f32 CPU tensor as one vectorised pass per row, with its
/// own backward (`p ⊙ (g − Σ g ⊙ p)`); replaces the composite (max, `exp(x − max)`, sum,
/// division: five full passes forward, more backward). `None` when the op does not apply
/// (another device or dtype), so callers keep the composite.
pub fn softmax_last_dim_f32(x: &Tensor) -> Result<Option<Tensor>> {
    scaled_masked_softmax_f32(x, 1.0, None)
}

/// `softmax(x · scale + mask)` over the last dimension of an f32 CPU tensor in one pass per row
/// (the attention scores' scaling, mask and softmax fused), with its own backward for `x`
/// (`scale · p ⊙ (g − Σ g ⊙ p)`; the mask is a constant). `mask` must be one row per leading
/// index of `x`'s first dimension, i.e. shape `(b, 1, ..., 1, d)` for `x` of shape `(b, ..., d)`
/// (BERT's padding mask), or `(1, ..., 1, d)`. `None` when the op does not apply (another device
/// or dtype, a mask of another shape), so callers keep the composite.
pub fn scaled_masked_softmax_f32(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || x.rank() == 0 {
        return Ok(None);
    }
    let dims = x.dims();
    let d = dims[dims.len() - 1];
    let mask = match mask {
        None => None,
        Some(m) => {
            let md = m.dims();
            let ones_between = md.len() == dims.len() && md[1..md.len() - 1].iter().all(|&v| v == 1);
            if !ones_between || md[md.len() - 1] != d || (md[0] != 1 && md[0] != dims[0]) || m.track_op() {
                return Ok(None);
            }
            Some((m.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?, md[0]))
        }
    };
    let x = x.contiguous()?;
    Ok(Some(x.apply_op1(SoftmaxLastDim { scale: scale as f32, mask })?))
}

struct SoftmaxLastDim {
    scale: f32,
    /// Mask rows (each of the last dimension's width) and their count (1 or the first dimension).
    mask: Option<(Vec<f32>, usize)>,
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "pvera-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = storage.as_slice::<f32>()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("softmax: input must be contiguous".into()));
        };
        let mut dst = src[o1..o2].to_vec();
        let dims = layout.shape().dims();
        let d = dims[dims.len() - 1].max(1);
        // Rows sharing one mask row (everything under one index of the first dimension).
        let per_mask_row = (dst.len() / dims[0].max(1)).max(d);
        let rows_per_task = (4096 / d).max(1);
        let task = (d * rows_per_task).min(per_mask_row).max(d);
        // Tasks never straddle two mask rows: split by mask row first.
        dst.par_chunks_mut(per_mask_row).enumerate().for_each(|(bi, block)| {
            let m = self.mask.as_ref().map(|(m, n)| {
                let i = if *n == 1 { 0 } else { bi };
                &m[i * d..(i + 1) * d]
            });
            block.par_chunks_mut(task).for_each(|t| crate::simd::softmax_rows(t, d, self.scale, m));
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gp = (grad_res * res)?;
        let s = gp.sum_keepdim(candle_core::D::Minus1)?;
        let dx = (gp - res.broadcast_mul(&s)?)?;
        Ok(Some(if self.scale == 1.0 { dx } else { (dx * self.scale as f64)? }))
    }
}

/// The erf-GELU of an f32 CPU tensor (vectorised, on all threads), with its own backward;
/// erf as ATen's CPU kernels compute it (see `simd`). `None` when the op does not apply
/// (another device or dtype), so callers keep candle's `gelu_erf`.
pub fn gelu_erf_f32(x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    Ok(Some(x.apply_op1(GeluErf)?))
}

/// Elements per parallel task of the elementwise ops.
const ELEMENTWISE_TASK: usize = 16 * 1024;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "pvera-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let src = storage.as_slice::<f32>()?;
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg("gelu: input must be contiguous".into()));
        };
        let src = &src[o1..o2];
        let mut dst = vec![0f32; src.len()];
        src.par_chunks(ELEMENTWISE_TASK)
            .zip(dst.par_chunks_mut(ELEMENTWISE_TASK))
            .for_each(|(s, d)| crate::simd::gelu(s, d));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.to_dtype(candle_core::DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(ELEMENTWISE_TASK)
            .zip(x.par_chunks(ELEMENTWISE_TASK))
            .zip(g.par_chunks(ELEMENTWISE_TASK))
            .for_each(|((d, x), g)| crate::simd::gelu_grad(x, g, d));
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
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

    #[test]
    fn bias_matmul_matches_matmul_plus_bias_and_gives_only_the_input_gradient() {
        let dev = Device::Cpu;
        let xv: Vec<f32> = (0..7 * 33).map(|i| (i as f32 * 0.37).sin()).collect();
        let wv: Vec<f32> = (0..19 * 33).map(|i| (i as f32 * 0.91).cos()).collect();
        let x = Var::from_vec(xv, (7, 33), &dev).unwrap();
        let w = Tensor::from_vec(wv, (19, 33), &dev).unwrap(); // (out, in), used transposed
        let b = Tensor::from_vec((0..19).map(|i| i as f32 * 0.25 - 2.0).collect::<Vec<_>>(), 19, &dev).unwrap();
        for bias in [Some(&b), None] {
            let y_ref = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let y_ref = match bias {
                Some(b) => y_ref.broadcast_add(b).unwrap(),
                None => y_ref,
            };
            let y = matmul_bias_const(x.as_tensor(), &w.t().unwrap(), bias).unwrap();
            close(&y, &y_ref, 1e-6);
            let g_ref = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            close(g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap(), 1e-5);
            assert!(g.get(&w).is_none(), "no gradient for the frozen weight");
        }
        // A contiguous rhs (Conv1D's (in, out) layout) and a strided lhs view.
        let wc = w.t().unwrap().contiguous().unwrap();
        let xt = x.as_tensor().t().unwrap().contiguous().unwrap().t().unwrap();
        let y = matmul_bias_const(&xt, &wc, Some(&b)).unwrap();
        close(&y, &xt.matmul(&wc).unwrap().broadcast_add(&b).unwrap(), 1e-6);
        // An empty batch.
        let e = Tensor::zeros((0, 33), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(matmul_bias_const(&e, &wc, Some(&b)).unwrap().dims(), [0, 19]);
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

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= tol * (1.0 + q.abs()), "{p} vs {q}");
        }
    }

    #[test]
    fn softmax_matches_the_composite_and_has_the_same_gradient() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..3 * 5 * 37).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
        let x = Var::from_vec(v, (3, 5, 37), &dev).unwrap();
        let w: Vec<f32> = (0..3 * 5 * 37).map(|i| ((i * 31) % 17) as f32 * 0.01).collect();
        let w = Tensor::from_vec(w, (3, 5, 37), &dev).unwrap();
        let a = softmax_last_dim_f32(x.as_tensor()).unwrap().unwrap();
        let b = composite_softmax(x.as_tensor());
        close(&a, &b, 1e-6);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap(), 1e-6);
    }

    #[test]
    fn scaled_masked_softmax_matches_scale_mask_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let (b, h, s) = (3, 2, 19);
        let v: Vec<f32> = (0..b * h * s * s).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
        let x = Var::from_vec(v, (b, h, s, s), &dev).unwrap();
        // BERT's padding mask: 0 to keep, the dtype's minimum to drop, one row per batch item.
        let m: Vec<f32> = (0..b * s).map(|i| if i % s >= s - 1 - i / s * 3 { f32::MIN } else { 0.0 }).collect();
        let mask = Tensor::from_vec(m, (b, 1, 1, s), &dev).unwrap();
        let up: Vec<f32> = (0..b * h * s * s).map(|i| ((i * 31) % 17) as f32 * 0.01).collect();
        let up = Tensor::from_vec(up, (b, h, s, s), &dev).unwrap();
        for (scale, mask) in [(0.125, Some(&mask)), (0.3, None)] {
            let a = scaled_masked_softmax_f32(x.as_tensor(), scale, mask).unwrap().unwrap();
            let scaled = (x.as_tensor() * scale).unwrap();
            let scored = match mask {
                Some(m) => scaled.broadcast_add(m).unwrap(),
                None => scaled,
            };
            let c = composite_softmax(&scored);
            close(&a, &c, 1e-6);
            let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
            close(ga.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap(), 1e-6);
        }
        // A mask that is not one row per batch item is left to the composite.
        let odd = Tensor::zeros((b, 1, s, s), candle_core::DType::F32, &dev).unwrap();
        assert!(scaled_masked_softmax_f32(x.as_tensor(), 1.0, Some(&odd)).unwrap().is_none());
    }

    #[test]
    fn gelu_matches_candle_within_the_erf_approximation_and_has_the_analytic_gradient() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 4.5e-4).collect();
        let x = Var::from_vec(v, (200, 200), &dev).unwrap();
        let a = gelu_erf_f32(x.as_tensor()).unwrap().unwrap();
        let c = x.as_tensor().gelu_erf().unwrap();
        close(&a, &c, 1e-6);
        let up = Tensor::from_vec((0..40_000).map(|i| ((i * 31) % 17) as f32 * 0.1).collect::<Vec<_>>(), (200, 200), &dev)
            .unwrap();
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
        close(ga.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap(), 2e-6);
    }
}
