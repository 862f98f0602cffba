//! Seeded train / validation splits.
//!
//! The permutation is PyTorch's: [`randperm`]`(n, seed)` equals
//! `torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()` (the CPU
//! Fisher-Yates of `randperm_cpu` on the MT19937 stream of [`crate::TorchGenerator`]), so a
//! PyTorch script can reproduce every split exactly:
//!
//! - [`train_val_split`] without stratification =
//!   `torch.utils.data.random_split(range(n), [n - n_val, n_val], generator=...)`:
//!   train = `perm[..n - n_val]`, val = `perm[n - n_val..]`.
//! - [`train_size_subset`] (VTAB-1k's "1000 = 800 train + 200 val"): the first `N` of the
//!   permutation, train = its first `N - N/5`, val = the next `N/5`; `rest` = the unused examples
//!   in permutation order (a held-out pool for testing).
//!
//! Stratified variants keep each class's share: per class, the examples in permutation order,
//! counts allocated proportionally by largest remainder (ties to the lower class id).

use crate::error::{Error, Result};
use crate::rng::TorchGenerator;

/// Indices of a split, each list in permutation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Training examples.
    pub train: Vec<usize>,
    /// Validation examples.
    pub val: Vec<usize>,
    /// Examples in neither (only [`train_size_subset`] leaves any).
    pub rest: Vec<usize>,
}

/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` as indices
/// ([`TorchGenerator::randperm`] on a fresh generator).
pub fn randperm(n: usize, seed: u64) -> Vec<usize> {
    TorchGenerator::new(seed).randperm(n)
}

/// How many examples go to validation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValSize {
    /// `floor(n * f)`, at least 1; `0 < f < 1`.
    Fraction(f64),
    /// Exactly this many.
    Count(usize),
}

fn val_count(n: usize, val: ValSize) -> Result<usize> {
    let k = match val {
        ValSize::Fraction(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::Data(format!(
                    "validation fraction {f} must be strictly between 0 and 1 (e.g. 0.2)"
                )));
            }
            ((n as f64 * f).floor() as usize).max(1)
        }
        ValSize::Count(k) => k,
    };
    if k == 0 || k >= n {
        return Err(Error::Data(format!(
            "cannot take {k} validation example(s) from {n}: both train and validation need at least one"
        )));
    }
    Ok(k)
}

/// Proportional allocation of `total` over classes with `sizes`, largest remainder, capped by
/// the class sizes.
fn allocate(sizes: &[usize], total: usize) -> Vec<usize> {
    let n: usize = sizes.iter().sum();
    let total = total.min(n);
    if total == 0 {
        return vec![0; sizes.len()];
    }
    let mut out: Vec<usize> = sizes.iter().map(|&s| s * total / n).collect();
    let mut rem: Vec<(usize, usize)> =
        sizes.iter().enumerate().map(|(c, &s)| ((s * total) % n, c)).collect();
    // Largest remainder first; ties to the lower class id.
    rem.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut left = total - out.iter().sum::<usize>();
    for &(_, c) in rem.iter().cycle() {
        if left == 0 {
            break;
        }
        if out[c] < sizes[c] {
            out[c] += 1;
            left -= 1;
        }
    }
    out
}

/// From `perm`, picks `counts[c]` examples of each class c (first in permutation order);
/// returns (picked, not picked), both in permutation order.
fn take_per_class(perm: &[usize], labels: &[u32], counts: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut taken = vec![0usize; counts.len()];
    let mut picked = Vec::new();
    let mut other = Vec::new();
    for &i in perm {
        let c = labels[i] as usize;
        if taken[c] < counts[c] {
            taken[c] += 1;
            picked.push(i);
        } else {
            other.push(i);
        }
    }
    (picked, other)
}

fn class_sizes(labels: &[u32], n: usize) -> Result<Vec<usize>> {
    if labels.len() != n {
        return Err(Error::Data(format!(
            "stratified split: {} labels for {n} examples; pass the data set's class ids",
            labels.len()
        )));
    }
    let k = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut sizes = vec![0usize; k];
    for &l in labels {
        sizes[l as usize] += 1;
    }
    Ok(sizes)
}

/// Splits `0..n` into train and validation with a seeded permutation; `stratify` = the class id
/// of each example to keep class shares equal in both parts.
pub fn train_val_split(n: usize, val: ValSize, seed: u64, stratify: Option<&[u32]>) -> Result<Split> {
    if n < 2 {
        return Err(Error::Data(format!("cannot split {n} example(s) into train and validation; need at least 2")));
    }
    let k = val_count(n, val)?;
    let perm = randperm(n, seed);
    match stratify {
        None => {
            let val = perm[n - k..].to_vec();
            let mut train = perm;
            train.truncate(n - k);
            Ok(Split { train, val, rest: Vec::new() })
        }
        Some(labels) => {
            let sizes = class_sizes(labels, n)?;
            let counts = allocate(&sizes, k);
            let (val, train) = take_per_class(&perm, labels, &counts);
            Ok(Split { train, val, rest: Vec::new() })
        }
    }
}

/// VTAB-1k style subset: `train_size` examples drawn from `0..n` by a seeded permutation, split
/// into `train_size - train_size / 5` for training and `train_size / 5` for validation (1000 ->
/// 800 + 200). The unused examples are returned in `rest`.
pub fn train_size_subset(n: usize, train_size: usize, seed: u64, stratify: Option<&[u32]>) -> Result<Split> {
    if train_size < 2 {
        return Err(Error::Data(format!("--train-size {train_size}: need at least 2 examples (train + validation)")));
    }
    if train_size > n {
        return Err(Error::Data(format!(
            "--train-size {train_size} is larger than the data set ({n} examples); use at most {n}"
        )));
    }
    let n_val = (train_size / 5).max(1);
    let n_train = train_size - n_val;
    let perm = randperm(n, seed);
    match stratify {
        None => {
            let train = perm[..n_train].to_vec();
            let val = perm[n_train..train_size].to_vec();
            let rest = perm[train_size..].to_vec();
            Ok(Split { train, val, rest })
        }
        Some(labels) => {
            let sizes = class_sizes(labels, n)?;
            let subset_counts = allocate(&sizes, train_size);
            let (subset, rest) = take_per_class(&perm, labels, &subset_counts);
            let val_counts = allocate(&subset_counts, n_val);
            let (val, train) = take_per_class(&subset, labels, &val_counts);
            Ok(Split { train, val, rest })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_sums_and_respects_sizes() {
        assert_eq!(allocate(&[50, 30, 20], 10), vec![5, 3, 2]);
        assert_eq!(allocate(&[1, 1, 1], 2), vec![1, 1, 0]);
        assert_eq!(allocate(&[7, 3], 3).iter().sum::<usize>(), 3);
    }

    #[test]
    fn randperm_is_a_permutation() {
        let mut p = randperm(1000, 7);
        p.sort_unstable();
        assert_eq!(p, (0..1000).collect::<Vec<_>>());
    }
}
