//! [`SplitData`]: [`TrainData`] over a [`Dataset`] and a train / validation split of its indices:
//! training examples shuffled per epoch with [`shuffled_indices`], validation examples in order.

use std::sync::Arc;

use super::trainer::{shuffled_indices, Batches, TrainData};
use crate::data::{Batch, Dataset};
use crate::error::{Error, Result};

/// [`TrainData`] over a data set and a train/validation split of its indices.
pub struct SplitData {
    data: Arc<dyn Dataset>,
    train: Vec<usize>,
    val: Vec<usize>,
    batch_size: usize,
    seed: u64,
}

impl std::fmt::Debug for SplitData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitData")
            .field("train", &self.train.len())
            .field("val", &self.val.len())
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl SplitData {
    /// Training on the examples `train` of `data` (shuffled per epoch from `seed`), validation on
    /// `val` (in order), in batches of `batch_size`.
    pub fn new(data: Arc<dyn Dataset>, train: Vec<usize>, val: Vec<usize>, batch_size: usize, seed: u64) -> Result<Self> {
        crate::data::check_indices(&train, data.len(), "SplitData (train)")?;
        crate::data::check_indices(&val, data.len(), "SplitData (validation)")?;
        if train.is_empty() {
            return Err(Error::Model("no training examples: the split left the training set empty".into()));
        }
        if batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        Ok(SplitData { data, train, val, batch_size, seed })
    }
    /// Number of training examples.
    pub fn n_train(&self) -> usize {
        self.train.len()
    }
    /// Number of validation examples.
    pub fn n_val(&self) -> usize {
        self.val.len()
    }
}

impl TrainData for SplitData {
    type Batch = Batch;
    fn num_train_batches(&self) -> usize {
        self.train.len().div_ceil(self.batch_size)
    }
    fn train_batches(&mut self, epoch: usize) -> Result<Batches<'_, Batch>> {
        self.train_batches_from(epoch, 0)
    }
    fn train_batches_from(&mut self, epoch: usize, skip: usize) -> Result<Batches<'_, Batch>> {
        let order = shuffled_indices(self.train.len(), self.seed, epoch);
        let idx: Vec<usize> = order.into_iter().map(|i| self.train[i]).collect();
        let chunks: Vec<Vec<usize>> = idx.chunks(self.batch_size).skip(skip).map(<[usize]>::to_vec).collect();
        let data = self.data.clone();
        Ok(Box::new(chunks.into_iter().map(move |c| data.get_batch(&c))))
    }
    fn val_batches(&mut self) -> Result<Batches<'_, Batch>> {
        let chunks: Vec<Vec<usize>> = self.val.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        let data = self.data.clone();
        Ok(Box::new(chunks.into_iter().map(move |c| data.get_batch(&c))))
    }
}
