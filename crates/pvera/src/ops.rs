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

/// `(m, k, n)` of `x (m, k) · rhs (k, n)`, or candle's shape error naming `op`.
fn frozen_dims(layout: &Layout, rhs: &Tensor, op: &'static str) -> candle_core::Result<(usize, usize, usize)> {
    let (m, k) = layout.shape().dims2()?;
    let (k2, n) = rhs.dims2()?;
    if k != k2 {
        return Err(candle_core::Error::ShapeMismatchBinaryOp { lhs: layout.shape().clone(), rhs: rhs.shape().clone(), op });
    }
    Ok((m, k, n))
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
        let (m, k, n) = frozen_dims(layout, &self.rhs, "bias-matmul")?;
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
        // SAFETY: dst is a contiguous (m, n) buffer; lhs and rhs cover every element their
        // strides address (checked above). dst := dst + lhs · rhs (dst holds the bias rows).
        unsafe {
            gemm_f32(m, n, k, dst.as_mut_ptr(), (n, 1), true, lhs.as_ptr(), (ls[0], ls[1]), rhs.as_ptr(), (rst[0], rst[1]), true)
        };
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
        let (m, k, n) = frozen_dims(layout, &self.rhs, "const-matmul")?;
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
        let src = contiguous_f32(storage, layout, "softmax: input")?;
        let dims = layout.shape().dims();
        let d = dims[dims.len() - 1].max(1);
        // Rows that share one mask row (everything under one index of the first dimension).
        let rows_per_mask = (src.len() / dims[0].max(1) / d).max(1);
        let rows_per_task = (4096 / d).max(1);
        let dst = par_copy_map(src, rows_per_task * d, |first, block| {
            let first_row = first / d;
            match &self.mask {
                None => crate::simd::softmax_rows(block, d, self.scale, None),
                Some((m, n)) => {
                    for (i, row) in block.chunks_mut(d).enumerate() {
                        let mi = if *n == 1 { 0 } else { (first_row + i) / rows_per_mask };
                        crate::simd::softmax_rows(row, d, self.scale, Some(&m[mi * d..(mi + 1) * d]));
                    }
                }
            }
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

/// A copy of `src` transformed in parallel: tasks of `task` elements (the last one shorter) each
/// copy their part of `src` into the new buffer and apply `f(offset, part)` to it in place, while
/// it is in cache. Saves the zero fill and the serial copy of the obvious `vec![0; n]` / `to_vec`.
fn par_copy_map(src: &[f32], task: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let n = src.len();
    let task = task.max(1);
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n].par_chunks_mut(task).zip(src.par_chunks(task)).enumerate().for_each(
        |(i, (d, s))| {
            // SAFETY: `d` and `s` have the same length (same chunking of equal lengths) and do
            // not overlap; after the copy every element of `d` is initialised.
            let d = unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), d.as_mut_ptr().cast::<f32>(), s.len());
                std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<f32>(), s.len())
            };
            f(i * task, d);
        },
    );
    // SAFETY: the chunks above cover all `n` elements and each was written (a panic in a task
    // propagates before this line).
    unsafe { out.set_len(n) };
    out
}

/// Elements per parallel task of the elementwise ops.
const ELEMENTWISE_TASK: usize = 16 * 1024;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "pvera-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "gelu: input")?;
        let dst = par_copy_map(src, ELEMENTWISE_TASK, |_, block| crate::simd::gelu_in_place(block));
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

/// Runs `f` on the contiguous f32 elements of a CPU tensor (no copy when it is contiguous
/// already, as the cached projection slices are).
fn with_cpu_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(st) = &*st else {
        return Err(candle_core::Error::Msg(format!("{what} must be on the CPU")));
    };
    Ok(f(contiguous_f32(st, l, what)?))
}

/// `x (m, k) · w (k, n)` of two f32 CPU tensors into a fresh row-major buffer, on all threads
/// (one GEMM straight from the tensors' storage: no intermediate tensor, no copy out of it).
fn gemm_to_vec(x: &Tensor, w: &Tensor) -> Result<Vec<f32>> {
    let (m, k) = x.dims2()?;
    let (k2, n) = w.dims2()?;
    if k != k2 {
        return Err(crate::error::Error::Model(format!("gemm: ({m}, {k}) · ({k2}, {n})")));
    }
    let out = with_cpu_f32(x, "gemm: lhs", |xv| {
        with_cpu_f32(w, "gemm: rhs", |wv| {
            if xv.len() != m * k || wv.len() != k * n {
                return Err(crate::error::Error::Model("gemm: operand sizes".into()));
            }
            let mut out = vec![0f32; m * n];
            // SAFETY: sizes checked; all three buffers are contiguous row-major.
            unsafe { gemm_f32(m, n, k, out.as_mut_ptr(), (n, 1), false, xv.as_ptr(), (k, 1), wv.as_ptr(), (n, 1), true) };
            Ok(out)
        })
    })???;
    Ok(out)
}

/// The sampled PVeRA adapter path of one layer with gradients off (ε from `eps(n · R)`), on f32 CPU tensors, as two
/// GEMMs and one fused pass: `h = x · A_t` (`A_t` = `(in, 2R)`), the reparametrisation
/// ([`crate::simd::reparam_rows`]: `z = mu + ε ⊙ exp(0.5 · logvar)`), then `z · (B_t ⊙ λ_b)`
/// (`B_t` = `(R, out)`; λ_b folded into the projection's columns). Replaces seven elementwise
/// passes of the composite (λ_d scale, the log-variance check's copy, halving, exp, the two
/// products, λ_b scale). Returns the `(n, out)` delta and how many log-variances exceeded
/// `limit` (or were NaN), for the caller's overflow error. `None` where it does not apply
/// (another device or dtype, a tensor that tracks gradients).
pub fn sampled_delta_no_grad(
    x: &Tensor,
    a_t: &Tensor,
    ld: &Tensor,
    eps: impl FnOnce(usize) -> Result<Vec<f32>> + Send,
    b_t: &Tensor,
    lb: &Tensor,
    limit: f32,
    xa: Option<std::sync::Arc<Vec<f32>>>,
) -> Result<Option<SampledOut>> {
    use rayon::prelude::*;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op();
    if ![x, a_t, ld, b_t, lb].iter().all(|t| f32_cpu(t)) || x.rank() != 2 || a_t.rank() != 2 || b_t.rank() != 2 {
        return Ok(None);
    }
    let (n, inf) = x.dims2()?;
    let (r, out) = b_t.dims2()?;
    if a_t.dims() != [inf, 2 * r] || ld.dims() != [2 * r] || lb.dims() != [out] {
        return Ok(None);
    }
    // Drawn only once the op is known to apply (callers fall back to a path drawing the same).
    // The (serial) generator runs on one thread while the GEMM `x · A_t` runs on the others.
    let (eps, h) = match xa {
        Some(h) if h.len() == n * 2 * r => (eps(n * r)?, h),
        _ => {
            let (eps, h) = rayon::join(|| eps(n * r), || gemm_to_vec(x, a_t)); // h: (n, 2R)
            (eps?, std::sync::Arc::new(h?))
        }
    };
    if eps.len() != n * r {
        return Err(crate::error::Error::Model(format!("sampled path: {} normal draws, expected {}", eps.len(), n * r)));
    }
    let ldv = ld.to_vec1::<f32>()?;
    let mut z = eps;
    let rows = (8192 / (2 * r).max(1)).max(1);
    let over: usize = h
        .par_chunks(rows * 2 * r)
        .zip(z.par_chunks_mut(rows * r))
        .map(|(h, z)| crate::simd::reparam_rows(h, &ldv, z, r, limit))
        .sum();
    let z = Tensor::from_vec(z, (n, r), x.device())?;
    let bs = b_t.broadcast_mul(&lb.reshape((1, out))?)?; // (R, out) ⊙ λ_b per column
    Ok(Some(SampledOut { delta: z.matmul(&bs)?, over, xa: h }))
}

/// What the fused sampled adapter paths return.
pub struct SampledOut {
    /// The layer's adapter output, `(n, out)`.
    pub delta: Tensor,
    /// How many log-variances exceeded the limit (or were NaN).
    pub over: usize,
    /// `x · A_t` (`n × 2R`, before λ_d), for sites that read the same input.
    pub xa: std::sync::Arc<Vec<f32>>,
}

/// The sampled PVeRA adapter path of one layer with gradients, on f32 CPU tensors:
/// `delta = λ_b ⊙ (z · B_t)` with `z = mu + ε ⊙ exp(0.5 · logvar)`, `[mu | logvar] = λ_d ⊙ (x · A_t)`
/// (`A_t` = `(in, 2R)`, `B_t` = `(R, out)`, ε = `(n, R)` drawn by the caller), as one op with its
/// own backward for `x`, `λ_d` and `λ_b`: two GEMMs and one fused pass forward, two GEMMs and
/// one fused pass (with the λ column sums) backward, where the composite needs about twenty
/// candle ops and their intermediates. Returns the delta and how many log-variances exceeded
/// `limit` (or were NaN). `None` where it does not apply (another device or dtype, shapes).
pub fn sampled_delta(
    x: &Tensor,
    a_t: &Tensor,
    ld: &Tensor,
    eps: impl FnOnce(usize) -> Result<Vec<f32>>,
    b_t: &Tensor,
    lb: &Tensor,
    limit: f32,
    xa: Option<std::sync::Arc<Vec<f32>>>,
) -> Result<Option<SampledOut>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if ![x, a_t, ld, b_t, lb].iter().all(|t| f32_cpu(t)) || x.rank() != 2 || a_t.rank() != 2 || b_t.rank() != 2 {
        return Ok(None);
    }
    let (n, inf) = x.dims2()?;
    let (r, out) = b_t.dims2()?;
    if a_t.dims() != [inf, 2 * r] || ld.dims() != [2 * r] || lb.dims() != [out] || a_t.track_op() || b_t.track_op() {
        return Ok(None);
    }
    let eps = eps(n * r)?;
    if eps.len() != n * r {
        return Err(crate::error::Error::Model(format!("sampled path: {} normal draws, expected {}", eps.len(), n * r)));
    }
    let over = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let saved = std::sync::Arc::new(std::sync::Mutex::new(None));
    let op = SampledAdapter {
        a_t: a_t.contiguous()?,
        b_t: b_t.contiguous()?,
        eps,
        r,
        inf,
        out,
        limit,
        over: over.clone(),
        xa: xa.filter(|h| h.len() == n * 2 * r),
        saved: saved.clone(),
    };
    let y = x.contiguous()?.apply_op3(&ld.contiguous()?, &lb.contiguous()?, op)?;
    let h = saved.lock().ok().and_then(|g| g.as_ref().map(|s| s.h.clone()));
    let h = h.ok_or_else(|| crate::error::Error::Model("sampled path: the forward kept no state".into()))?;
    Ok(Some(SampledOut { delta: y, over: over.load(std::sync::atomic::Ordering::Relaxed), xa: h }))
}

struct SampledSaved {
    /// `x · A_t`, (n, 2R), before λ_d.
    h: std::sync::Arc<Vec<f32>>,
    /// `z · B_t`, (n, out), before λ_b.
    u: Vec<f32>,
}

struct SampledAdapter {
    /// The frozen projection slices, `(in, 2R)` and `(R, out)`, contiguous (shared, not copied).
    a_t: Tensor,
    b_t: Tensor,
    eps: Vec<f32>,
    r: usize,
    inf: usize,
    out: usize,
    limit: f32,
    /// Log-variances above `limit` (or NaN) in the forward, for the caller.
    over: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// `x · A_t` computed by a site that read the same input, if any.
    xa: Option<std::sync::Arc<Vec<f32>>>,
    /// What backward needs, shared with the caller (which hands `h` on to the next site).
    saved: std::sync::Arc<std::sync::Mutex<Option<SampledSaved>>>,
}

impl candle_core::CustomOp3 for SampledAdapter {
    fn name(&self) -> &'static str {
        "pvera-sampled-adapter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, ld, lb) = (contiguous_f32(s1, l1, "sampled adapter: x")?, contiguous_f32(s2, l2, "sampled adapter: λ_d")?, contiguous_f32(s3, l3, "sampled adapter: λ_b")?);
        self.with_projections(|a_t, b_t| self.forward(x, ld, lb, a_t, b_t))?
    }

    fn bwd(
        &self,
        x: &Tensor,
        ld: &Tensor,
        lb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.with_projections(|a_t, b_t| self.backward(x, ld, lb, grad, a_t, b_t))?
    }
}

impl SampledAdapter {
    /// Runs `f` on the contiguous elements of A_t and B_t, checked against the op's sizes.
    fn with_projections<R>(&self, f: impl FnOnce(&[f32], &[f32]) -> R) -> candle_core::Result<R> {
        with_cpu_f32(&self.a_t, "sampled adapter: A", |a_t| {
            with_cpu_f32(&self.b_t, "sampled adapter: B", |b_t| {
                if a_t.len() != self.inf * 2 * self.r || b_t.len() != self.r * self.out {
                    return Err(candle_core::Error::Msg("sampled adapter: projection sizes".into()));
                }
                Ok(f(a_t, b_t))
            })?
        })?
    }

    fn forward(&self, x: &[f32], ld: &[f32], lb: &[f32], a_t: &[f32], b_t: &[f32]) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (r, inf, out) = (self.r, self.inf, self.out);
        let n = x.len() / inf.max(1);
        if x.len() != n * inf || ld.len() != 2 * r || lb.len() != out || self.eps.len() != n * r {
            return Err(candle_core::Error::Msg("sampled adapter: inconsistent shapes".into()));
        }
        let h = match &self.xa {
            Some(h) => h.clone(),
            None => {
                let mut h = vec![0f32; n * 2 * r];
                // SAFETY: sizes checked above; A_t is (inf, 2R) contiguous.
                unsafe {
                    gemm_f32(n, 2 * r, inf, h.as_mut_ptr(), (2 * r, 1), false, x.as_ptr(), (inf, 1), a_t.as_ptr(), (2 * r, 1), true)
                };
                std::sync::Arc::new(h)
            }
        };
        let mut z = self.eps.clone();
        let rows = (8192 / (2 * r).max(1)).max(1);
        let over: usize = h
            .par_chunks(rows * 2 * r)
            .zip(z.par_chunks_mut(rows * r))
            .map(|(h, z)| crate::simd::reparam_rows(h, ld, z, r, self.limit))
            .sum();
        let mut u = vec![0f32; n * out];
        // SAFETY: z is (n, R), B_t (R, out), u (n, out), all contiguous.
        unsafe { gemm_f32(n, out, r, u.as_mut_ptr(), (out, 1), false, z.as_ptr(), (r, 1), b_t.as_ptr(), (out, 1), true) };
        let mut y = u.clone();
        y.par_chunks_mut(out.max(1) * 64).for_each(|c| {
            for row in c.chunks_mut(out.max(1)) {
                for (v, l) in row.iter_mut().zip(lb) {
                    *v *= l;
                }
            }
        });
        self.over.store(over, std::sync::atomic::Ordering::Relaxed);
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("sampled adapter: poisoned state".into()))? =
            Some(SampledSaved { h, u });
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn backward(
        &self,
        x: &Tensor,
        ld: &Tensor,
        lb: &Tensor,
        grad: &Tensor,
        a_t: &[f32],
        b_t: &[f32],
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let guard = self.saved.lock().map_err(|_| candle_core::Error::Msg("sampled adapter: poisoned state".into()))?;
        let Some(saved) = guard.as_ref() else {
            return Err(candle_core::Error::Msg("sampled adapter: backward before forward".into()));
        };
        let (r, inf, out) = (self.r, self.inf, self.out);
        let n = saved.h.len() / (2 * r).max(1);
        let g = cpu_f32(grad)?;
        let ldv = cpu_f32(ld)?;
        let lbv = cpu_f32(lb)?;
        if g.len() != n * out {
            return Err(candle_core::Error::Msg("sampled adapter: gradient shape".into()));
        }
        // gl = g ⊙ λ_b, and dλ_b = Σ_rows g ⊙ u (per-task partial sums).
        let rows = (16384 / out.max(1)).max(1);
        let mut gl = g.clone();
        let dlb = gl
            .par_chunks_mut(rows * out)
            .zip(saved.u.par_chunks(rows * out))
            .map(|(gc, uc)| {
                let mut acc = vec![0f32; out];
                for (gr, ur) in gc.chunks_mut(out).zip(uc.chunks(out)) {
                    for o in 0..out {
                        acc[o] += gr[o] * ur[o];
                        gr[o] *= lbv[o];
                    }
                }
                acc
            })
            .reduce(|| vec![0f32; out], |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            });
        // gz = gl · B_tᵀ: rhs(o, j) = B_t[j, o].
        let mut gz = vec![0f32; n * r];
        // SAFETY: gl (n, out), B_t (R, out), gz (n, R), all contiguous.
        unsafe { gemm_f32(n, r, out, gz.as_mut_ptr(), (r, 1), false, gl.as_ptr(), (out, 1), b_t.as_ptr(), (1, out), true) };
        // dh and dλ_d in one pass.
        let mut dh = vec![0f32; n * 2 * r];
        let rows = (8192 / (2 * r).max(1)).max(1);
        let dld = dh
            .par_chunks_mut(rows * 2 * r)
            .zip(saved.h.par_chunks(rows * 2 * r))
            .zip(gz.par_chunks(rows * r).zip(self.eps.par_chunks(rows * r)))
            .map(|((dhc, hc), (gzc, ec))| {
                let mut acc = vec![0f32; 2 * r];
                crate::simd::reparam_grad_rows(hc, &ldv, gzc, ec, dhc, &mut acc, r);
                acc
            })
            .reduce(|| vec![0f32; 2 * r], |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            });
        // dx = dh · A_tᵀ: rhs(c, k) = A_t[k, c].
        let mut dx = vec![0f32; n * inf];
        // SAFETY: dh (n, 2R), A_t (inf, 2R), dx (n, inf), all contiguous.
        unsafe { gemm_f32(n, inf, 2 * r, dx.as_mut_ptr(), (inf, 1), false, dh.as_ptr(), (2 * r, 1), a_t.as_ptr(), (1, 2 * r), true) };
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dld, ld.shape(), dev)?),
            Some(Tensor::from_vec(dlb, lb.shape(), dev)?),
        ))
    }
}

/// Multi-head self-attention `softmax(q kᵀ · scale + mask) v` on f32 CPU tensors in the
/// projections' own layout: `q`, `k`, `v` and the result are `(b, s, heads · head_dim)`, so the
/// head split and merge (four transposing copies) disappear. Each (batch, head) pair is one
/// parallel task that keeps its `(s, s)` scores in cache: two small GEMMs straight on the strided
/// head slices, the fused scale + mask + softmax between them. Backward (for all three inputs)
/// recomputes the probabilities per task instead of keeping `b · heads · s²` of them alive
/// through the backward pass. `mask` as in [`scaled_masked_softmax_f32`]: `(b | 1, 1, 1, s)`,
/// constant. `None` when the op does not apply (another device or dtype, other shapes), so the
/// caller keeps the composite.
pub fn attention_f32(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !(f32_cpu(q) && f32_cpu(k) && f32_cpu(v)) || q.rank() != 3 || k.dims() != q.dims() || v.dims() != q.dims() {
        return Ok(None);
    }
    let (b, s, dm) = q.dims3()?;
    if heads == 0 || dm % heads != 0 || s == 0 {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) => {
            let md = m.dims();
            if md.len() != 4 || md[1] != 1 || md[2] != 1 || md[3] != s || (md[0] != 1 && md[0] != b) || m.track_op() {
                return Ok(None);
            }
            Some((m.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?, md[0]))
        }
    };
    let op = Attention { b, s, heads, hd: dm / heads, scale: scale as f32, mask };
    Ok(Some(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?))
}

struct Attention {
    b: usize,
    s: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    mask: Option<(Vec<f32>, usize)>,
}

/// A raw pointer that parallel tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint (batch, head) column blocks, one task each.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// candle's GEMM (the `gemm` crate) on raw f32 buffers: `dst (m, n) := lhs (m, k) · rhs (k, n)`,
/// or `dst += lhs · rhs` with `accumulate`; strides as (row, column) pairs in elements; on all of
/// candle's threads when `parallel`, else on the calling thread (callers that parallelise
/// themselves, e.g. over attention heads).
///
/// # Safety
/// Every pointer must address all elements its strides reach for the given sizes, and `dst` must
/// not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    lhs_s: (usize, usize),
    rhs: *const f32,
    rhs_s: (usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = if parallel { candle_core::utils::get_num_threads() } else { 1 };
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let alpha = if accumulate { 1f32 } else { 0f32 };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_s.1 as isize,
        dst_s.0 as isize,
        accumulate,
        lhs,
        lhs_s.1 as isize,
        lhs_s.0 as isize,
        rhs,
        rhs_s.1 as isize,
        rhs_s.0 as isize,
        alpha,
        1f32,
        false,
        false,
        false,
        par,
    )
}

impl Attention {
    fn mask_row(&self, bi: usize) -> Option<&[f32]> {
        self.mask.as_ref().map(|(m, n)| {
            let i = if *n == 1 { 0 } else { bi };
            &m[i * self.s..(i + 1) * self.s]
        })
    }

    /// Probabilities of one (batch, head) task into `p` (s × s).
    ///
    /// # Safety
    /// `q`, `k` hold `b · s · heads · hd` elements.
    unsafe fn probs(&self, q: *const f32, k: *const f32, bi: usize, hi: usize, p: &mut [f32]) {
        let (s, dm) = (self.s, self.heads * self.hd);
        let off = bi * s * dm + hi * self.hd;
        // p = Q_bh · K_bhᵀ: rhs(c, j) = K[j, c].
        gemm_f32(s, s, self.hd, p.as_mut_ptr(), (s, 1), false, q.add(off), (dm, 1), k.add(off), (1, dm), false);
        crate::simd::softmax_rows(p, s, self.scale, self.mask_row(bi));
    }

    fn check(&self, n: usize) -> candle_core::Result<()> {
        if n != self.b * self.s * self.heads * self.hd {
            return Err(candle_core::Error::Msg(format!(
                "attention: {n} elements, expected {} x {} x {} x {}",
                self.b, self.s, self.heads, self.hd
            )));
        }
        Ok(())
    }
}

/// The contiguous f32 data of a CPU tensor.
fn cpu_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// A contiguous CPU storage's f32 elements.
fn contiguous_f32<'a>(st: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Some((o1, o2)) = l.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!("{what} must be contiguous")));
    };
    Ok(&st.as_slice::<f32>()?[o1..o2])
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "pvera-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (q, k, v) = (contiguous_f32(s1, l1, "attention: q")?, contiguous_f32(s2, l2, "attention: k")?, contiguous_f32(s3, l3, "attention: v")?);
        for t in [q, k, v] {
            self.check(t.len())?;
        }
        let (s, dm) = (self.s, self.heads * self.hd);
        let mut out = vec![0f32; q.len()];
        let o = SharedMut(out.as_mut_ptr());
        (0..self.b * self.heads).into_par_iter().for_each_init(
            || vec![0f32; s * s],
            |p, t| {
                let (bi, hi) = (t / self.heads, t % self.heads);
                let off = bi * s * dm + hi * self.hd;
                let o = o;
                // SAFETY: q, k, v, out hold b·s·dm elements (checked); this task writes only its
                // own (bi, hi) column block of `out`.
                unsafe {
                    self.probs(q.as_ptr(), k.as_ptr(), bi, hi, p);
                    gemm_f32(s, self.hd, s, o.0.add(off), (dm, 1), false, p.as_ptr(), (s, 1), v.as_ptr().add(off), (dm, 1), false);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((self.b, s, dm))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let (qv, kv, vv, g) = (cpu_f32(q)?, cpu_f32(k)?, cpu_f32(v)?, cpu_f32(grad)?);
        for t in [&qv, &kv, &vv, &g] {
            self.check(t.len())?;
        }
        let (s, hd, dm) = (self.s, self.hd, self.heads * self.hd);
        let (mut dq, mut dk, mut dv) = (vec![0f32; qv.len()], vec![0f32; qv.len()], vec![0f32; qv.len()]);
        let (pq, pk, pv) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        let scale = self.scale;
        (0..self.b * self.heads).into_par_iter().for_each_init(
            || (vec![0f32; s * s], vec![0f32; s * s]),
            |(p, dp), t| {
                let (bi, hi) = (t / self.heads, t % self.heads);
                let off = bi * s * dm + hi * hd;
                let (pq, pk, pv) = (pq, pk, pv);
                // SAFETY: all buffers hold b·s·dm elements (checked); this task writes only its
                // own (bi, hi) column blocks of dq, dk, dv.
                unsafe {
                    let (qp, kp, vp, gp) = (qv.as_ptr(), kv.as_ptr(), vv.as_ptr(), g.as_ptr().add(off));
                    self.probs(qp, kp, bi, hi, p);
                    // dP = dO · Vᵀ
                    gemm_f32(s, s, hd, dp.as_mut_ptr(), (s, 1), false, gp, (dm, 1), vp.add(off), (1, dm), false);
                    // dV = Pᵀ · dO
                    gemm_f32(s, hd, s, pv.0.add(off), (dm, 1), false, p.as_ptr(), (1, s), gp, (dm, 1), false);
                    // dS = scale · P ⊙ (dP − Σ_j dP ⊙ P)
                    for (pr, dr) in p.chunks(s).zip(dp.chunks_mut(s)) {
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (d, pe) in dr.iter_mut().zip(pr) {
                            *d = scale * pe * (*d - dot);
                        }
                    }
                    // dQ = dS · K, dK = dSᵀ · Q
                    gemm_f32(s, hd, s, pq.0.add(off), (dm, 1), false, dp.as_ptr(), (s, 1), kp.add(off), (dm, 1), false);
                    gemm_f32(s, hd, s, pk.0.add(off), (dm, 1), false, dp.as_ptr(), (1, s), qp.add(off), (dm, 1), false);
                }
            },
        );
        let dev = q.device();
        let shape = q.shape();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
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
        let src = contiguous_f32(storage, layout, "layer norm: input")?;
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

    #[test]
    fn fused_attention_matches_the_composite_forward_and_all_three_gradients() {
        let dev = Device::Cpu;
        let (b, s, heads, hd) = (2, 21, 3, 8);
        let mk = |seed: usize| {
            let v: Vec<f32> = (0..b * s * heads * hd).map(|i| (((i + seed) * 7919) % 211) as f32 * 0.013 - 1.3).collect();
            Var::from_vec(v, (b, s, heads * hd), &dev).unwrap()
        };
        let (q, k, v) = (mk(1), mk(5), mk(11));
        let m: Vec<f32> = (0..b * s).map(|i| if i >= s && i % s >= s - 4 { f32::MIN } else { 0.0 }).collect();
        let mask = Tensor::from_vec(m, (b, 1, 1, s), &dev).unwrap();
        let up: Vec<f32> = (0..b * s * heads * hd).map(|i| ((i * 31) % 17) as f32 * 0.1 - 0.8).collect();
        let up = Tensor::from_vec(up, (b, s, heads * hd), &dev).unwrap();
        let scale = (hd as f64).powf(-0.5);
        for mask in [Some(&mask), None] {
            let a = attention_f32(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, mask, scale).unwrap().unwrap();
            let split = |t: &Tensor| t.reshape((b, s, heads, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            let scores = split(q.as_tensor()).matmul(&split(k.as_tensor()).t().unwrap()).unwrap();
            let scores = (scores * scale).unwrap();
            let scores = match mask {
                Some(m) => scores.broadcast_add(m).unwrap(),
                None => scores,
            };
            let c = composite_softmax(&scores).matmul(&split(v.as_tensor())).unwrap();
            let c = c.transpose(1, 2).unwrap().contiguous().unwrap().reshape((b, s, heads * hd)).unwrap();
            close(&a, &c, 1e-5);
            let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for x in [&q, &k, &v] {
                close(ga.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap(), 1e-5);
            }
        }
        // Shapes it does not handle are left to the composite.
        let odd = Tensor::zeros((b, 1, s, s), candle_core::DType::F32, &dev).unwrap();
        assert!(attention_f32(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, Some(&odd), scale).unwrap().is_none());
        assert!(attention_f32(q.as_tensor(), k.as_tensor(), v.as_tensor(), 5, None, scale).unwrap().is_none());
    }

    #[test]
    fn fused_sampled_adapter_matches_the_composite_forward_and_gradients() {
        let dev = Device::Cpu;
        let (n, inf, r, out) = (37, 24, 5, 19);
        let mk = |len: usize, seed: usize, sc: f32| -> Vec<f32> {
            (0..len).map(|i| ((((i + seed) * 7919) % 211) as f32 * 0.0095 - 1.0) * sc).collect()
        };
        let x = Var::from_vec(mk(n * inf, 1, 1.0), (n, inf), &dev).unwrap();
        let ld = Var::from_vec(mk(2 * r, 3, 0.8), 2 * r, &dev).unwrap();
        let lb = Var::from_vec(mk(out, 7, 0.5), out, &dev).unwrap();
        let a_t = Tensor::from_vec(mk(inf * 2 * r, 11, 0.3), (inf, 2 * r), &dev).unwrap();
        let b_t = Tensor::from_vec(mk(r * out, 13, 0.3), (r, out), &dev).unwrap();
        let eps = mk(n * r, 17, 1.5);
        let up = Tensor::from_vec(mk(n * out, 19, 1.0), (n, out), &dev).unwrap();
        let out = sampled_delta(x.as_tensor(), &a_t, ld.as_tensor(), |_| Ok(eps.clone()), &b_t, lb.as_tensor(), 88.0, None)
            .unwrap()
            .unwrap();
        assert_eq!(out.over, 0);
        let a = out.delta;
        // Handing the computed x·A to a second call (the next site on the same input) changes nothing.
        let again =
            sampled_delta(x.as_tensor(), &a_t, ld.as_tensor(), |_| Ok(eps.clone()), &b_t, lb.as_tensor(), 88.0, Some(out.xa.clone()))
                .unwrap()
                .unwrap();
        close(&again.delta, &a, 0.0);
        let ng = sampled_delta_no_grad(&x.as_tensor().detach(), &a_t, &ld.as_tensor().detach(), |_| Ok(eps.clone()), &b_t,
            &lb.as_tensor().detach(), 88.0, Some(out.xa.clone()))
            .unwrap()
            .unwrap();
        close(&ng.delta, &a, 1e-5);
        // The composite, as the layer computes it without the fused op.
        let h = x.as_tensor().matmul(&a_t).unwrap().broadcast_mul(ld.as_tensor()).unwrap();
        let (mu, lv) = (h.narrow(1, 0, r).unwrap(), h.narrow(1, r, r).unwrap());
        let e = Tensor::from_vec(eps.clone(), (n, r), &dev).unwrap();
        let z = (mu + (e * (lv * 0.5).unwrap().exp().unwrap()).unwrap()).unwrap();
        let c = z.matmul(&b_t).unwrap().broadcast_mul(lb.as_tensor()).unwrap();
        close(&a, &c, 1e-5);
        let ga = (a * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (c * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &ld, &lb] {
            close(ga.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap(), 1e-5);
        }
        // An overflowing log-variance is counted (the layer turns it into its named error).
        let big = Tensor::from_vec(vec![500f32; 2 * r], 2 * r, &dev).unwrap();
        let big_out =
            sampled_delta(x.as_tensor(), &a_t, &big, |_| Ok(eps.clone()), &b_t, lb.as_tensor(), 88.0, None).unwrap().unwrap();
        assert!(big_out.over > 0);
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
