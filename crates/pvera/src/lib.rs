//! # pvera
//!
//! PVeRA (Probabilistic Vector-based Random Matrix Adaptation, arXiv 2512.07703) adapters on
//! [candle](https://github.com/huggingface/candle), with exact parity with Hugging Face PEFT's
//! `PveraConfig` (peft 0.21.2): the same `adapter_config.json` and `adapter_model.safetensors`,
//! projections regenerated bit for bit from `projection_prng_key`, and the same outputs. VeRA
//! adapters (PEFT's `VeraConfig`, PVeRA without the probabilistic latent) run through the same
//! code, told apart by [`Method`].
//!
//! Map (see `ARCHITECTURE.md`):
//! - [`config`]: [`PveraConfig`] <-> `adapter_config.json` (PVeRA or VeRA, [`Method`]).
//! - [`rng`]: a PyTorch-exact CPU generator (MT19937, `kaiming_uniform_`, `randn`, dropout).
//! - [`projection`]: the shared frozen A and B.
//! - [`layer`]: the adaptable linear site and the PVeRA / VeRA math (forward, KL, ΔW, merge).
//! - [`state`]: mode, sampling, active adapters and KL terms shared by all layers of a model.
//! - [`builder`]: the model [`Builder`] and the site [`Registry`].
//! - [`targets`]: PEFT's target-module matching and default targets.
//! - [`peft_model`]: [`PeftModel`], the adapter lifecycle.
//! - [`checkpoint`]: PEFT's file and key names, atomic saving.
//! - [`models`]: model families built through the builder, task heads.
//! - [`train`]: AdamW, schedules and the training loop.
//! - [`uncertainty`]: Monte Carlo prediction, intervals, calibration, OOD scores.
//! - [`predictor`]: [`Predictor`], model + classifier adapters + task metadata -> predictions
//!   with uncertainty (the path every front end shares).
//! - [`validate`]: every load check that needs no model, all problems of an adapter directory.
#![warn(missing_docs)]

pub mod builder;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod layer;
pub mod method;
pub mod models;
pub mod ops;
mod simd;
pub mod peft_model;
pub mod predictor;
pub mod projection;
mod pyjson;
mod pyregex;
pub mod rng;
pub mod state;
pub mod targets;
pub mod train;
pub mod uncertainty;
pub mod validate;

pub use config::{Method, PveraConfig};
pub use error::{Error, Result};
pub use builder::{Builder, ModelInfo, Registry};
pub use layer::{Linear, LinearKind};
pub use peft_model::PeftModel;
pub use predictor::Predictor;
pub use projection::Projections;
pub use rng::{TorchGenerator, TorchKernel};
pub use state::{Mode, NoisePolicy, RunState, Sampling};
