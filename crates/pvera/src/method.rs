//! [`Method`]: PVeRA or VeRA, the one fact that tells the two adapter types apart. It sits below
//! every other module (the error type names it too), so it depends on nothing in the crate.

use std::fmt;

/// The `peft_type` of every PVeRA config.
pub const PEFT_TYPE: &str = "PVERA";

/// The `peft_type` of every VeRA config.
pub const VERA_PEFT_TYPE: &str = "VERA";

/// The adapter method: PVeRA (a probabilistic latent, `mu | logvar`) or VeRA (its deterministic
/// parent). Read from `peft_type`; everything the two share runs through one code path, and the
/// places where they differ ask this (docs/peft-behaviour.md §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Method {
    /// PEFT's `PveraConfig` (`peft_type` `"PVERA"`): `A` is `(2r, in)`, `λ_d` has `2r` entries, the
    /// latent can be sampled.
    #[default]
    Pvera,
    /// PEFT's `VeraConfig` (`peft_type` `"VERA"`): `A` is `(r, in)`, `λ_d` has `r` entries, nothing is
    /// sampled.
    Vera,
}

impl Method {
    /// Both methods.
    pub const ALL: [Method; 2] = [Method::Pvera, Method::Vera];

    /// The `peft_type` value (`"PVERA"` / `"VERA"`).
    pub fn peft_type(self) -> &'static str {
        match self {
            Method::Pvera => PEFT_TYPE,
            Method::Vera => VERA_PEFT_TYPE,
        }
    }

    /// The method of a `peft_type` value, if it is one of the two.
    pub fn from_peft_type(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.peft_type() == s)
    }

    /// The method's name in prose (`"PVeRA"` / `"VeRA"`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Pvera => "PVeRA",
            Method::Vera => "VeRA",
        }
    }

    /// The lower-case stem PEFT builds its names from (`pvera_dropout`, `pvera_lambda_b`, the
    /// `pvera_only` bias; `vera_...`). The tensor keys themselves are spelled in
    /// [`crate::checkpoint`].
    pub fn stem(self) -> &'static str {
        match self {
            Method::Pvera => "pvera",
            Method::Vera => "vera",
        }
    }

    /// Rows of the projection `A` and entries of `λ_d` for rank `r`: `2r` for PVeRA (mean and
    /// log-variance halves), `r` for VeRA.
    pub fn latent_rows(self, r: usize) -> usize {
        match self {
            Method::Pvera => 2 * r,
            Method::Vera => r,
        }
    }

    /// Whether the adapter has a latent to sample (PVeRA): Monte Carlo prediction, sampling at
    /// inference and the KL term exist only then.
    pub fn samples(self) -> bool {
        matches!(self, Method::Pvera)
    }

    /// PEFT's class name of the model wrapper (`PveraModel` / `VeraModel`), as its messages use it.
    pub fn model_class(self) -> &'static str {
        match self {
            Method::Pvera => "PveraModel",
            Method::Vera => "VeraModel",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    /// `pvera` / `vera` (any case), or the `peft_type` spellings.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pvera" => Ok(Method::Pvera),
            "vera" => Ok(Method::Vera),
            _ => Err(format!("unknown method {s:?}: expected pvera or vera")),
        }
    }
}

