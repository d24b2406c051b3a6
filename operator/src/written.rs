//! What the writer last wrote to each node's objects, so that a node marked again before the
//! write's own watch event has reached the cache is not written a second time with the same
//! content (at thousands of nodes the cache can lag a write by seconds, and every program
//! reconcile marks every node it touches).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// How long a write is trusted over a cache that does not show it yet. Past this, a cache
/// without the object means someone deleted it, and the writer writes again.
const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// The writer's memory of its own writes, by object kind and node.
#[derive(Default)]
pub struct Written {
    entries: Mutex<HashMap<(String, String), Memo>>,
}

struct Memo {
    digest: u64,
    uid: Option<String>,
    generation: i64,
    at: Instant,
}

/// A digest of the spec to write.
pub fn digest(spec: &serde_json::Value) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.to_string().hash(&mut h);
    h.finish()
}

impl Written {
    /// True when this writer wrote exactly `digest` to `kind`/`node` and the cached object
    /// (`cached`) is that write or an older version of the same object: the cache lags the
    /// write, and writing again would change nothing.
    pub fn lagging(
        &self,
        kind: &str,
        node: &str,
        digest: u64,
        cached: Option<&ObjectMeta>,
    ) -> bool {
        let entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(m) = entries.get(&(kind.to_string(), node.to_string())) else {
            return false;
        };
        if m.digest != digest || m.at.elapsed() > TRUSTED_FOR {
            return false;
        }
        match cached {
            // Not in the cache yet: the write created it.
            None => true,
            Some(meta) => meta.uid == m.uid && meta.generation.unwrap_or(0) <= m.generation,
        }
    }

    /// Remembers a write of `digest` whose result the API server returned as `meta`.
    pub fn note(&self, kind: &str, node: &str, digest: u64, meta: &ObjectMeta) {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Entries past their trust are of no use any more.
        if entries.len() > 1024 && entries.len().is_power_of_two() {
            entries.retain(|_, m| m.at.elapsed() <= TRUSTED_FOR);
        }
        entries.insert(
            (kind.to_string(), node.to_string()),
            Memo {
                digest,
                uid: meta.uid.clone(),
                generation: meta.generation.unwrap_or(0),
                at: Instant::now(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(uid: &str, generation: i64) -> ObjectMeta {
        ObjectMeta {
            uid: Some(uid.into()),
            generation: Some(generation),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_cache_behind_the_same_write_is_lagging_and_anything_else_is_not() {
        let w = Written::default();
        let d = digest(&serde_json::json!({"programs": ["a"]}));
        let other = digest(&serde_json::json!({"programs": ["b"]}));
        assert!(!w.lagging("state", "n1", d, None), "nothing written yet");
        w.note("state", "n1", d, &meta("u1", 4));
        assert!(w.lagging("state", "n1", d, None));
        assert!(w.lagging("state", "n1", d, Some(&meta("u1", 3))));
        assert!(w.lagging("state", "n1", d, Some(&meta("u1", 4))));
        assert!(
            !w.lagging("state", "n1", d, Some(&meta("u1", 5))),
            "changed since"
        );
        assert!(
            !w.lagging("state", "n1", d, Some(&meta("u2", 1))),
            "recreated"
        );
        assert!(
            !w.lagging("state", "n1", other, Some(&meta("u1", 3))),
            "other content"
        );
        assert!(!w.lagging("profile", "n1", d, None), "other kind");
        assert!(!w.lagging("state", "n2", d, None), "other node");
    }
}
