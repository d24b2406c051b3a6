//! Offline checking of YAML documents: parse, type-check with paths, flag unknown fields,
//! then run semantic validation. Used by `bpfpoly-operator validate` and by the operator.

use serde::Deserialize;

use crate::program::BpfPolyProgram;
use crate::validate::{spec_warnings, validate_program, FieldError};

/// Largest document accepted, to keep hostile input bounded.
pub const MAX_DOCUMENT_BYTES: usize = 4 << 20;

/// The result of checking one document of a stream.
#[derive(Debug)]
pub struct DocumentReport {
    /// Zero-based index of the document in the stream.
    pub index: usize,
    /// `kind/name`, when it could be read.
    pub object: String,
    /// Every problem found; empty means valid.
    pub errors: Vec<FieldError>,
    /// What is allowed but probably not meant (see [`spec_warnings`]); never makes it invalid.
    pub warnings: Vec<FieldError>,
}

fn err(path: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Checks every document of a multi-document YAML stream. Empty documents are skipped.
pub fn check_stream(text: &str) -> Vec<DocumentReport> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return vec![DocumentReport {
            index: 0,
            object: "?".into(),
            errors: vec![err(
                "",
                format!(
                    "input is {} bytes; the limit is {MAX_DOCUMENT_BYTES}",
                    text.len()
                ),
            )],
            warnings: Vec::new(),
        }];
    }
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(DocumentReport {
                    index,
                    object: "?".into(),
                    errors: vec![err("", format!("not valid YAML: {e}"))],
                    warnings: Vec::new(),
                });
                // A syntax error ends the stream: later documents cannot be located reliably.
                break;
            }
        };
        out.push(check_value(index, value));
    }
    out
}

/// Checks one parsed document.
pub fn check_value(index: usize, value: serde_json::Value) -> DocumentReport {
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("?");
    let object = format!("{}/{}", if kind.is_empty() { "?" } else { kind }, name);
    let mut errors = Vec::new();
    let api = value
        .get("apiVersion")
        .and_then(|a| a.as_str())
        .unwrap_or("");
    if api != "bpfpoly.io/v1alpha1" {
        errors.push(err(
            "apiVersion",
            format!("{api:?} must be \"bpfpoly.io/v1alpha1\""),
        ));
    }
    if kind != "BpfPolyProgram" {
        errors.push(err("kind", format!("{kind:?} must be \"BpfPolyProgram\"")));
        return DocumentReport {
            index,
            object,
            errors,
            warnings: Vec::new(),
        };
    }
    let mut unknown = Vec::new();
    let mut warnings = Vec::new();
    let typed: Result<BpfPolyProgram, _> = serde_path_to_error::deserialize(&value)
        .map_err(|e| (e.path().to_string(), e.into_inner().to_string()));
    match typed {
        Err((path, msg)) => errors.push(err(&path, msg)),
        Ok(program) => {
            let _: Result<BpfPolyProgram, _> = serde_ignored::deserialize(&value, |p| {
                unknown.push(bracket_indices(&p.to_string()))
            });
            for p in unknown {
                let envelope = ["apiVersion", "kind", "status"];
                if !envelope.contains(&p.as_str())
                    && !p.starts_with("status.")
                    && !p.starts_with("metadata.")
                {
                    errors.push(err(&p, "unknown field"));
                }
            }
            errors.extend(validate_program(&program));
            warnings = spec_warnings(&program.spec);
        }
    }
    DocumentReport {
        index,
        object,
        errors,
        warnings,
    }
}

/// `spec.variants.0.require` → `spec.variants[0].require`, matching the other paths.
fn bracket_indices(path: &str) -> String {
    let mut out = String::new();
    for seg in path.split('.') {
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(seg);
        }
    }
    out
}
