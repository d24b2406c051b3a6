//! What an assignment needs before the blocking load: interface renames for a second agent
//! on the same host, and every bytecode it may use (built-in, ConfigMap or path), fetched and
//! checked against its digest.

use bpfpoly_agent::builtin;
use bpfpoly_agent::fetch::{check_sha256, describe, fetch_path, FetchError, Prefetched};
use bpfpoly_crds::program::Bytecode;
use bpfpoly_crds::state::ProgramAssignment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use super::Agent;

impl Agent {
    /// Renames interfaces for a second agent on the same host.
    pub(super) fn aliased(&self, a: &ProgramAssignment) -> ProgramAssignment {
        let mut a = a.clone();
        if self.opts.interface_aliases.is_empty() {
            return a;
        }
        let rename = |i: &mut String| {
            if let Some((_, to)) = self
                .opts
                .interface_aliases
                .iter()
                .find(|(from, _)| from == i)
            {
                i.clone_from(to);
            }
        };
        for v in &mut a.candidates {
            for p in &mut v.programs {
                if let Some(att) = &mut p.attach {
                    if let Some(x) = &mut att.xdp {
                        x.interfaces.iter_mut().for_each(rename);
                    }
                    if let Some(t) = &mut att.tc {
                        t.interfaces.iter_mut().for_each(rename);
                    }
                }
            }
        }
        a
    }

    /// Fetches every bytecode the assignment may need (ConfigMaps are async, so before the
    /// blocking load).
    pub(super) async fn prefetch(&self, a: &ProgramAssignment) -> Prefetched {
        let mut out = Prefetched::default();
        for v in &a.candidates {
            for b in std::iter::once(&v.bytecode).chain(v.handler_bytecode.iter()) {
                if out.contains(b) {
                    continue;
                }
                let got = self.fetch_one(b).await;
                out.insert(b, got);
            }
        }
        out
    }

    async fn fetch_one(&self, b: &Bytecode) -> Result<Vec<u8>, FetchError> {
        if let Some(name) = &b.builtin {
            let bytes = builtin::builtin(name).ok_or_else(|| FetchError::Unavailable {
                what: format!("builtin {name:?}"),
                reason: format!(
                    "no such built-in object; this agent has {}",
                    builtin::names().join(", ")
                ),
            })?;
            check_sha256(bytes, b.sha256.as_deref())?;
            return Ok(bytes.to_vec());
        }
        if let Some(cm) = &b.config_map {
            let what = describe(b);
            if !self.opts.configmap_namespaces.contains(&cm.namespace) {
                return Err(FetchError::Unavailable {
                    what,
                    reason: format!(
                        "namespace {:?} is not one this agent reads bytecode from ({})",
                        cm.namespace,
                        self.opts.configmap_namespaces.join(", ")
                    ),
                });
            }
            let sha = b
                .sha256
                .as_deref()
                .ok_or_else(|| FetchError::MissingSha256 { what: what.clone() })?;
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &cm.namespace);
            let map = api
                .get_opt(&cm.name)
                .await
                .map_err(|e| FetchError::Unavailable {
                    what: what.clone(),
                    reason: e.to_string(),
                })?
                .ok_or_else(|| FetchError::Unavailable {
                    what: what.clone(),
                    reason: "ConfigMap not found".into(),
                })?;
            let bytes = map
                .binary_data
                .and_then(|d| d.get(&cm.key).map(|b| b.0.clone()))
                .ok_or_else(|| FetchError::Unavailable {
                    what: what.clone(),
                    reason: format!("no binaryData key {:?}", cm.key),
                })?;
            if bytes.len() as u64 > self.opts.max_object_bytes {
                return Err(FetchError::TooLarge {
                    what,
                    size: bytes.len() as u64,
                    limit: self.opts.max_object_bytes,
                });
            }
            check_sha256(&bytes, Some(sha))?;
            return Ok(bytes);
        }
        if let Some(path) = &b.path {
            return fetch_path(
                path,
                b.sha256.as_deref(),
                &self.opts.allowed_dirs,
                self.opts.max_object_bytes,
            );
        }
        Err(FetchError::Unavailable {
            what: describe(b),
            reason: "none of builtin, configMap and path is set".into(),
        })
    }
}
