//! The integration-test binary: PEFT parity on golden fixtures, adapter lifecycle, checkpoints.

mod common;
mod peft_parity;
mod lifecycle;
mod bad_input;
mod crash_safety;
mod data;
