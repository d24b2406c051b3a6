//! Error text for status and logs: an error with its whole chain of causes.

use std::error::Error as StdError;

/// An error and its sources, joined.
pub(super) fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
