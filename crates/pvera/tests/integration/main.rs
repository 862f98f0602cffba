//! The integration-test binary: PEFT parity on golden fixtures, adapter lifecycle, checkpoints,
//! model families against transformers, data loading, training, VeRA adapters.

mod bad_input;
mod calibrated;
mod common;
mod conformal;
mod crash_safety;
mod data;
mod error_catalogue;
mod fuzz;
mod lifecycle;
mod mixed;
mod models_bert;
mod models_decoders;
mod models_vision;
mod peft_parity;
mod predictor;
mod train;
mod uncertainty;
mod validate;
mod vera;
