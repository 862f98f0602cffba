//! Model families built through [`crate::Builder`], with Hugging Face module names.
//!
//! - [`mlp`]: the small test models PEFT's own test-suite uses (an MLP and a GPT-2 `Conv1D`
//!   stack), used for parity tests against PEFT fixtures.

pub mod mlp;
