//! STUB: replaced by the helper's torch-exact generator.
#![allow(missing_docs, dead_code)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TorchKernel { #[default] Avx2, Default }
#[derive(Clone, Debug)]
pub struct TorchGenerator { seed: u64, s: u64, kernel: TorchKernel }
impl TorchGenerator {
    pub fn new(seed: u64) -> Self { Self { seed, s: seed ^ 0x9e37, kernel: TorchKernel::Avx2 } }
    pub fn with_kernel(seed: u64, kernel: TorchKernel) -> Self { Self { seed, s: seed ^ 0x9e37, kernel } }
    pub fn manual_seed(&mut self, seed: u64) { self.seed = seed; self.s = seed ^ 0x9e37 }
    pub fn initial_seed(&self) -> u64 { self.seed }
    pub fn kernel(&self) -> TorchKernel { self.kernel }
    pub fn set_kernel(&mut self, k: TorchKernel) { self.kernel = k }
    fn next(&mut self) -> f32 { self.s = self.s.wrapping_mul(6364136223846793005).wrapping_add(1); ((self.s >> 40) as f32) / 16777216.0 }
    pub fn kaiming_uniform_f32(&mut self, rows: usize, cols: usize) -> Vec<f32> { let b = kaiming_bound(cols) as f32; (0..rows*cols).map(|_| (self.next()*2.0-1.0)*b).collect() }
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> { (0..n).map(|_| self.next()*2.0-1.0).collect() }
    pub fn dropout_f32(&mut self, x: &mut [f32], p: f64) { for v in x.iter_mut() { if (self.next() as f64) < p { *v = 0.0 } else { *v /= (1.0 - p) as f32 } } }
}
pub fn kaiming_bound(fan_in: usize) -> f64 { 3f64.sqrt() * (2f64.sqrt() / (fan_in as f64).sqrt()) }
