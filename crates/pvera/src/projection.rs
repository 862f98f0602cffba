//! The shared, frozen random projections of PVeRA and VeRA.
//!
//! One pair `A: f32[2R, IN]` (VeRA: `f32[R, IN]`, [`Method::latent_rows`]), `B: f32[OUT, R]` serves
//! every adapted layer; a layer with `in` inputs and `out` outputs uses `A[:, :in]` and `B[:out, :]`.
//! PEFT draws them with `kaiming_uniform_` (VeRA: its own `_kaiming_init`, the same bound
//! `sqrt(3) · sqrt(2) / sqrt(fan_in)` and the same `uniform_`) from
//! `torch.Generator().manual_seed(projection_prng_key)`, A first, then B from the same stream
//! (docs/torch-rng.md §5); [`Projections::generate`] reproduces that bit for bit through
//! [`crate::rng`].
//!
//! Slices are materialised contiguously once per width and cached, so the forward pass never
//! copies a strided view of A or B.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{proj_a_name, proj_b_name};
use crate::config::Method;
use crate::error::{Error, Result};
use crate::rng::{TorchGenerator, TorchKernel};

/// Shared frozen projections `A` (2R x IN; VeRA: R x IN) and `B` (OUT x R), always f32.
#[derive(Debug)]
pub struct Projections {
    method: Method,
    a: Tensor,
    b: Tensor,
    r: usize,
    /// Where the values came from.
    origin: ProjectionOrigin,
    a_cache: Mutex<HashMap<usize, (Tensor, Tensor)>>,
    b_cache: Mutex<HashMap<usize, Tensor>>,
    /// The last `x · A[:, :in]ᵀ` computed from a given input tensor (see [`Projections::xa`]).
    xa_cache: Mutex<Option<XaEntry>>,
}

/// One cached product of an input with the shared A: sites that read the same input tensor
/// (query and value of one attention block) and share these projections need it only once.
#[derive(Debug)]
struct XaEntry {
    x: candle_core::TensorId,
    in_features: usize,
    rows: usize,
    h: std::sync::Arc<Vec<f32>>,
}

/// How a [`Projections`] pair was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionOrigin {
    /// Regenerated from `projection_prng_key` with the given torch kernel.
    Generated {
        /// The 64-bit key (only its low 32 bits reach MT19937, as in torch).
        key: u64,
        /// The kernel variant used.
        kernel: TorchKernel,
    },
    /// Read from a checkpoint (`base_model.pvera_A` / `base_model.pvera_B`, or VeRA's).
    Checkpoint,
}

impl Projections {
    /// Draws A (`method.latent_rows(r)` x in_max) then B (out_max x r) exactly as PEFT does.
    pub fn generate(
        method: Method,
        key: u64,
        r: usize,
        in_max: usize,
        out_max: usize,
        kernel: TorchKernel,
        device: &Device,
    ) -> Result<Self> {
        let (a, b) = generate_raw(method, key, r, in_max, out_max, kernel);
        let a = Tensor::from_vec(a, (method.latent_rows(r), in_max), device)?;
        let b = Tensor::from_vec(b, (out_max, r), device)?;
        Self::from_parts(method, a, b, ProjectionOrigin::Generated { key, kernel })
    }

    /// Wraps existing tensors (e.g. from a checkpoint), checking their shapes agree on `r`.
    pub fn from_tensors(method: Method, a: Tensor, b: Tensor) -> Result<Self> {
        Self::from_parts(method, a, b, ProjectionOrigin::Checkpoint)
    }

    fn from_parts(method: Method, a: Tensor, b: Tensor, origin: ProjectionOrigin) -> Result<Self> {
        let (an, bn) = (proj_a_name(method), proj_b_name(method));
        let rows_s = if method.samples() { "2r" } else { "r" };
        let (rows, _in_max) = a.dims2().map_err(|_| {
            Error::Projection(format!("{an} must be 2-D ({rows_s}, in), got shape {:?}", a.dims()))
        })?;
        let (_out_max, r) = b.dims2().map_err(|_| {
            Error::Projection(format!("{bn} must be 2-D (out, r), got shape {:?}", b.dims()))
        })?;
        if rows != method.latent_rows(r) {
            let why = if method.samples() { " (mean and log-variance halves)" } else { "" };
            return Err(Error::Projection(format!(
                "{an} has {rows} rows but {bn} has {r} columns; {} needs A with {rows_s} rows{why} for B \
                 with r columns",
                method.name()
            )));
        }
        let a = a.to_dtype(DType::F32)?.contiguous()?;
        let b = b.to_dtype(DType::F32)?.contiguous()?;
        Ok(Self {
            method,
            a,
            b,
            r,
            origin,
            a_cache: Mutex::new(HashMap::new()),
            b_cache: Mutex::new(HashMap::new()),
            xa_cache: Mutex::new(None),
        })
    }

    /// The method whose shapes these are (A has 2R rows for PVeRA, R for VeRA).
    pub fn method(&self) -> Method {
        self.method
    }
    /// The rank R (B's columns).
    pub fn r(&self) -> usize {
        self.r
    }
    /// Largest input width (columns of A).
    pub fn in_max(&self) -> usize {
        self.a.dims()[1]
    }
    /// Largest output width (rows of B).
    pub fn out_max(&self) -> usize {
        self.b.dims()[0]
    }
    /// The full A (2R x IN; VeRA: R x IN).
    pub fn a(&self) -> &Tensor {
        &self.a
    }
    /// The full B (OUT x R).
    pub fn b(&self) -> &Tensor {
        &self.b
    }
    /// Where the values came from.
    pub fn origin(&self) -> ProjectionOrigin {
        self.origin
    }
    /// The device holding the projections.
    pub fn device(&self) -> &Device {
        self.a.device()
    }

    /// The cached `x · A[:, :in]ᵀ` (`rows × A's rows`, row-major) of the input tensor `x`, if it is the
    /// last one stored for this width. Tensors are immutable and ids unique, so an id names the
    /// values (callers never key a `Var`, whose values can change under the same id).
    pub fn xa(&self, x: candle_core::TensorId, in_features: usize, rows: usize) -> Option<std::sync::Arc<Vec<f32>>> {
        let g = self.xa_cache.lock().ok()?;
        match g.as_ref() {
            Some(e) if e.x == x && e.in_features == in_features && e.rows == rows => Some(e.h.clone()),
            _ => None,
        }
    }

    /// Stores `x · A[:, :in]ᵀ` for [`Projections::xa`] (replacing the previous entry).
    pub fn store_xa(&self, x: candle_core::TensorId, in_features: usize, rows: usize, h: std::sync::Arc<Vec<f32>>) {
        if let Ok(mut g) = self.xa_cache.lock() {
            *g = Some(XaEntry { x, in_features, rows, h });
        }
    }

    /// `A[:, :in]` as a contiguous (2R, in) tensor (VeRA: (R, in)) and its transpose laid out
    /// contiguously as (in, 2R), cached per width.
    pub fn a_slice_t(&self, in_features: usize) -> Result<Tensor> {
        Ok(self.a_slices(in_features)?.1)
    }

    /// `A[:, :in]` (2R, in; VeRA: (R, in)), contiguous, cached.
    pub fn a_slice(&self, in_features: usize) -> Result<Tensor> {
        Ok(self.a_slices(in_features)?.0)
    }

    fn a_slices(&self, in_features: usize) -> Result<(Tensor, Tensor)> {
        if in_features > self.in_max() {
            return Err(Error::Projection(format!(
                "{} has a size of {} but {in_features} or greater is required; this probably \
                 happened because an additional {} adapter was added after the first one with \
                 incompatible shapes.",
                proj_a_name(self.method),
                self.in_max(),
                self.method.name()
            )));
        }
        let mut cache = self.a_cache.lock().map_err(|_| poisoned())?;
        if let Some(hit) = cache.get(&in_features) {
            return Ok(hit.clone());
        }
        let s = self.a.narrow(1, 0, in_features)?.contiguous()?;
        let st = s.t()?.contiguous()?;
        cache.insert(in_features, (s.clone(), st.clone()));
        Ok((s, st))
    }

    /// `B[:out, :]` transposed to a contiguous (R, out) tensor, cached per width.
    pub fn b_slice_t(&self, out_features: usize) -> Result<Tensor> {
        if out_features > self.out_max() {
            return Err(Error::Projection(format!(
                "{} has a size of {} but {out_features} or greater is required; this probably \
                 happened because an additional {} adapter was added after the first one with \
                 incompatible shapes.",
                proj_b_name(self.method),
                self.out_max(),
                self.method.name()
            )));
        }
        let mut cache = self.b_cache.lock().map_err(|_| poisoned())?;
        if let Some(hit) = cache.get(&out_features) {
            return Ok(hit.clone());
        }
        let st = self.b.narrow(0, 0, out_features)?.t()?.contiguous()?;
        cache.insert(out_features, st.clone());
        Ok(st)
    }

    /// `B[:out, :]` (out, R), contiguous.
    pub fn b_slice(&self, out_features: usize) -> Result<Tensor> {
        Ok(self.b_slice_t(out_features)?.t()?.contiguous()?)
    }

    /// True when both matrices are bit-identical to `other`'s (and of the same method).
    pub fn bit_equal(&self, other: &Projections) -> Result<bool> {
        if self.method != other.method || self.a.dims() != other.a.dims() || self.b.dims() != other.b.dims() {
            return Ok(false);
        }
        Ok(count_bit_differences(&self.a, &other.a)? == 0
            && count_bit_differences(&self.b, &other.b)? == 0)
    }
}

fn poisoned() -> Error {
    Error::Model("a projection cache lock was poisoned by a panicking thread".into())
}

/// A (`method.latent_rows(r)` x in_max) then B (out_max x r) as row-major f32 vectors, drawn from
/// one torch generator seeded with `key`.
pub fn generate_raw(
    method: Method,
    key: u64,
    r: usize,
    in_max: usize,
    out_max: usize,
    kernel: TorchKernel,
) -> (Vec<f32>, Vec<f32>) {
    let mut g = TorchGenerator::with_kernel(key, kernel);
    let a = g.kaiming_uniform_f32(method.latent_rows(r), in_max);
    let b = g.kaiming_uniform_f32(out_max, r);
    (a, b)
}

/// Number of elements whose f32 bit patterns differ (shapes must agree).
pub fn count_bit_differences(x: &Tensor, y: &Tensor) -> Result<usize> {
    if x.dims() != y.dims() {
        return Err(Error::Projection(format!(
            "cannot compare tensors of shapes {:?} and {:?}",
            x.dims(),
            y.dims()
        )));
    }
    let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let yv = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(xv.iter().zip(&yv).filter(|(p, q)| p.to_bits() != q.to_bits()).count())
}
