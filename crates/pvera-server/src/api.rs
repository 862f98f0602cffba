//! Request bodies and their checks: JSON parsing that names the field that does not fit, the
//! shapes of `inputs` (pvera's `/classify`, text-embeddings-inference's `/predict` and `/embed`),
//! and base64 images.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// The largest image (width × height) a request may carry: bigger ones would take hundreds of
/// MB to decode before the model's preprocessing shrinks them anyway.
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;

/// A JSON body parsed into `T`. The body limit gives 413; bytes that are not JSON give 400; JSON
/// whose shape or types do not fit `T` gives 422 naming the field (`samples: invalid type: ...`).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(
                    "the request body is larger than the server's payload limit (--payload-limit); send fewer or \
                     smaller inputs per request",
                )
            } else {
                ApiError::malformed(format!("cannot read the request body: {rej}"))
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON body (see [`JsonBody`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::malformed("empty request body; send a JSON object such as {\"inputs\": \"some text\"}"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let at = if path == "." { String::new() } else { format!("field `{path}`: ") };
                ApiError::invalid(format!("{at}{inner}"))
            }
            _ => ApiError::malformed(format!(
                "the body is not valid JSON: {inner}; send one JSON object (UTF-8) such as {{\"inputs\": \"some text\"}}"
            )),
        }
    })?;
    de.end().map_err(|e| ApiError::malformed(format!("the body has data after its JSON object: {e}")))?;
    Ok(value)
}

/// `POST /classify`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// A text (or base64 image), or a list of them.
    pub inputs: Value,
    /// Adapter name (default: the server's default adapter).
    pub adapter: Option<String>,
    /// Monte Carlo samples: absent or 1 = mean mode only, ≥ 2 = sampled with statistics.
    pub samples: Option<usize>,
    /// Seed of the sampling noise (default 0).
    pub seed: Option<u64>,
    /// Confidence level of the interval (default 0.95).
    pub confidence: Option<f64>,
    /// Cut texts longer than the adapter's maximum length instead of refusing them (413).
    #[serde(default)]
    pub truncate: bool,
    /// Run the samples one forward each, as PEFT's example loop does (PEFT's exact noise for any
    /// shapes; `pvera predict --sequential`).
    #[serde(default)]
    pub sequential: bool,
    /// Use the adapter's `calibration.json` when it has one (default true; `pvera predict
    /// --no-calibration` is `false`).
    pub calibration: Option<bool>,
    /// Coverage `1 − α` of the prediction sets: one the calibration was fitted for (`--coverage`).
    pub coverage: Option<f64>,
    /// Conformity score of the sets: `lac`, `aps` or `raps`, one the calibration fitted (`--score`).
    pub score: Option<String>,
    /// Abstain also when the calibrated confidence is under this (`--abstain-below`).
    pub abstain_below: Option<f64>,
}

/// `POST /predict` (text-embeddings-inference's request, plus `adapter`).
#[derive(Debug, Deserialize)]
pub struct PredictRequest {
    /// A text, `[text]`, or a batch `[[text], [text], ...]` (TEI's shapes; pairs are refused).
    pub inputs: Value,
    /// Adapter name (default: the server's default adapter).
    pub adapter: Option<String>,
    /// Cut long texts instead of refusing them.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `Right` (the only direction pvera's tokenizer truncates in).
    pub truncation_direction: Option<String>,
    /// Scores as log-probabilities instead of probabilities.
    #[serde(default)]
    pub raw_scores: bool,
}

/// `POST /embed` (text-embeddings-inference's request, plus `adapter`, `samples`, `seed`).
#[derive(Debug, Deserialize)]
pub struct EmbedRequest {
    /// A text or a list of texts (base64 images for image models).
    pub inputs: Value,
    /// Adapter name (default: the server's default adapter).
    pub adapter: Option<String>,
    /// L2-normalise each embedding (default true, as TEI).
    #[serde(default = "yes")]
    pub normalize: bool,
    /// Cut long texts instead of refusing them.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// `Right` only.
    pub truncation_direction: Option<String>,
    /// TEI's prompt names: not supported (must be absent or null).
    pub prompt_name: Option<String>,
    /// TEI's Matryoshka truncation: not supported (must be absent or null).
    pub dimensions: Option<usize>,
    /// Sampled passes: ≥ 2 adds the per-dimension standard deviation.
    pub samples: Option<usize>,
    /// Seed of the sampling noise (default 0).
    pub seed: Option<u64>,
}

fn yes() -> bool {
    true
}

/// `POST /adapters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// The name requests will use.
    pub name: String,
    /// The adapter folder, relative to `--adapter-dir`.
    pub path: String,
}

/// Checks `truncation_direction` (TEI's field): only `Right` is implemented.
pub fn check_direction(d: &Option<String>) -> Result<(), ApiError> {
    match d.as_deref() {
        None => Ok(()),
        Some(x) if x.eq_ignore_ascii_case("right") => Ok(()),
        Some(x) => Err(ApiError::invalid(format!(
            "field `truncation_direction`: {x:?} is not supported; pvera truncates on the right (send \"Right\" or leave it out)"
        ))),
    }
}

fn strings(list: &[Value], field: &str) -> Result<Vec<String>, ApiError> {
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::invalid(format!(
                "field `{field}[{i}]`: expected a string, found {}",
                kind(other)
            ))),
        })
        .collect()
}

/// A JSON value's kind in words.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// `inputs` of `/classify` and `/embed`: a string or a list of strings. Returns the inputs and
/// whether a single string was sent.
pub fn string_or_list(v: &Value) -> Result<(Vec<String>, bool), ApiError> {
    match v {
        Value::String(s) => Ok((vec![s.clone()], true)),
        Value::Array(list) => {
            if list.is_empty() {
                return Err(ApiError::invalid("field `inputs`: an empty list; send at least one input"));
            }
            Ok((strings(list, "inputs")?, false))
        }
        other => Err(ApiError::invalid(format!(
            "field `inputs`: expected a string or a list of strings, found {}",
            kind(other)
        ))),
    }
}

/// `inputs` of `/predict` with text-embeddings-inference's rules: `"text"` or `["text"]` is one
/// input, `["a", "b"]` is a *pair* (one input of two texts), `[["a"], ["b"]]` is a batch.
/// pvera's classifiers read one text, so pairs are refused. Returns the inputs and whether the
/// answer is a single list (not a batch).
pub fn tei_predict_inputs(v: &Value) -> Result<(Vec<String>, bool), ApiError> {
    let pair = || {
        ApiError::invalid(
            "field `inputs`: a pair of texts [\"a\", \"b\"] is a single input of two sequences (text-embeddings-inference's \
             rule), and pvera's classifiers read one text; send a batch as [[\"a\"], [\"b\"]] or one text as \"a\"",
        )
    };
    match v {
        Value::String(s) => Ok((vec![s.clone()], true)),
        Value::Array(list) => match list.first() {
            None => Err(ApiError::invalid("field `inputs`: an empty list; send at least one input")),
            Some(Value::String(_)) => match list.len() {
                1 => Ok((strings(list, "inputs")?, true)),
                2 => {
                    strings(list, "inputs")?;
                    Err(pair())
                }
                n => Err(ApiError::invalid(format!(
                    "field `inputs`: a list of {n} strings; text-embeddings-inference's /predict takes \"text\", \
                     [\"text\"] or a batch [[\"a\"], [\"b\"], ...]"
                ))),
            },
            Some(_) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, item) in list.iter().enumerate() {
                    match item {
                        Value::Array(seq) if seq.len() == 1 => out.extend(strings(seq, &format!("inputs[{i}]"))?),
                        Value::Array(seq) if seq.len() == 2 => {
                            strings(seq, &format!("inputs[{i}]"))?;
                            return Err(pair());
                        }
                        Value::Array(seq) => {
                            return Err(ApiError::invalid(format!(
                                "field `inputs[{i}]`: a list of {} items; each batch item is [\"text\"]",
                                seq.len()
                            )))
                        }
                        other => {
                            return Err(ApiError::invalid(format!(
                                "field `inputs[{i}]`: expected [\"text\"], found {}",
                                kind(other)
                            )))
                        }
                    }
                }
                Ok((out, false))
            }
        },
        other => Err(ApiError::invalid(format!(
            "field `inputs`: expected a string, [\"text\"] or a batch [[\"a\"], [\"b\"]], found {}",
            kind(other)
        ))),
    }
}

/// Decodes one base64 image input (plain base64, or a `data:image/...;base64,` URL) into pixels.
/// Errors are 422 naming the input, or 413 for an image over [`MAX_IMAGE_PIXELS`].
pub fn decode_image(index: usize, s: &str) -> Result<pvera::data::images::RawImage, ApiError> {
    let b64 = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(";base64,") {
            Some((_, b)) => b,
            None => {
                return Err(ApiError::invalid(format!(
                    "input {index}: a data URL without \";base64,\"; send the image as base64 (PNG or JPEG)"
                )))
            }
        },
        None => s,
    };
    let b64 = b64.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(b64.trim_end_matches('=')))
        .map_err(|e| {
            ApiError::invalid(format!(
                "input {index}: not base64 ({e}); an image model takes each input as the base64 of a PNG or JPEG file"
            ))
        })?;
    let name = format!("input {index}");
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(format!("{name}: cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::invalid(format!(
            "{name}: not a PNG or JPEG image (unrecognised content after base64 decoding)"
        )));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::invalid(format!("{name}: cannot read the image header: {e}; the image is corrupt or truncated")))?;
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(ApiError::too_large(format!(
            "{name}: {w}x{h} pixels; at most {MAX_IMAGE_PIXELS} pixels (4096x4096) per image: scale it down first"
        )));
    }
    pvera::data::images::decode_image_bytes(&bytes, &name).map_err(ApiError::from_pvera)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tei_input_shapes() {
        assert_eq!(tei_predict_inputs(&json!("a")).unwrap(), (vec!["a".to_string()], true));
        assert_eq!(tei_predict_inputs(&json!(["a"])).unwrap(), (vec!["a".to_string()], true));
        assert_eq!(tei_predict_inputs(&json!([["a"], ["b"]])).unwrap(), (vec!["a".into(), "b".into()], false));
        for bad in [json!(["a", "b"]), json!([["a", "b"]]), json!(["a", "b", "c"]), json!([]), json!(3), json!([[1]]), json!([["a"], 2])] {
            let e = tei_predict_inputs(&bad).unwrap_err();
            assert_eq!(e.status, 422, "{bad}: {e}");
            assert!(e.message.contains("inputs"), "{e}");
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<ClassifyRequest>(br#"{"inputs": "x", "samples": "16"}"#).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.message.contains("samples") && e.message.contains("invalid type"), "{e}");
        let e = parse_json::<ClassifyRequest>(br#"{"inputs": "x", "sample": 3}"#).unwrap_err();
        assert!(e.status == 422 && e.message.contains("unknown field `sample`"), "{e}");
        let e = parse_json::<ClassifyRequest>(br#"{"inputs": "x""#).unwrap_err();
        assert_eq!(e.status, 400, "{e}");
        let e = parse_json::<ClassifyRequest>(b"{\"inputs\": \"\xff\"}").unwrap_err();
        assert_eq!(e.status, 400, "{e}");
        let deep = "[".repeat(10_000);
        let e = parse_json::<ClassifyRequest>(format!("{{\"inputs\": {deep}").as_bytes()).unwrap_err();
        assert_eq!(e.status, 400, "{e}");
        let e = parse_json::<ClassifyRequest>(b"  ").unwrap_err();
        assert_eq!(e.status, 400, "{e}");
    }

    #[test]
    fn bad_images_are_named() {
        let e = decode_image(2, "not base64 !!").unwrap_err();
        assert!(e.status == 422 && e.message.starts_with("input 2: not base64"), "{e}");
        let e = decode_image(0, &base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nxxxx")).unwrap_err();
        assert_eq!(e.status, 422, "{e}");
        let e = decode_image(0, "data:image/png,abc").unwrap_err();
        assert!(e.message.contains("data URL"), "{e}");
    }
}
