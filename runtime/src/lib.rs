//! The edges both binaries share with the outside world, in one home:
//! - [`client`]: a Kubernetes client from a kubeconfig file, or from the default chain
//!   (in-cluster, then `$KUBECONFIG`, then `~/.kube/config`);
//! - [`serve_http`]: `/metrics`, `/healthz` and `/readyz` on one address;
//! - [`WatchBackoff`]: how the watches of both retry after an API server outage.
//!
//! `bpfpoly-crds` stays pure (types, validation, selection; no I/O). This crate is the I/O
//! that the operator and the agent would otherwise each write for themselves.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use kube::Client;

/// The Kubernetes client could not be configured (the message names the kubeconfig).
#[derive(Debug, thiserror::Error)]
#[error("cannot configure the Kubernetes client: {0}")]
pub struct ClientError(pub String);

/// Builds a client from `kubeconfig`, or from the default chain when it is `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let named = |e: &dyn std::fmt::Display| ClientError(format!("{}: {e}", path.display()));
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| named(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| named(&e))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| ClientError(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| ClientError(e.to_string()))
}

/// The HTTP endpoint could not bind its address.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why it could not be bound.
    pub source: std::io::Error,
}

/// Serves `/metrics` (the text `metrics` renders, or its error as a 500), `/healthz` (always
/// "ok" while the process answers) and `/readyz` ("ready" once `ready` is set, else 503 with
/// `not_ready` as the reason). Binds before it returns, so a taken port is an error here;
/// the server itself runs on its own task.
pub async fn serve_http<F, Fut>(
    addr: SocketAddr,
    metrics: F,
    ready: Arc<AtomicBool>,
    not_ready: &'static str,
) -> Result<(), BindError>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send + 'static,
{
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = metrics();
                async move {
                    match render.await {
                        Ok(text) => (StatusCode::OK, text),
                        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, not_ready)
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Watch retries: 0.5 s doubling to at most 4 s. kube's default grows to 30 s and backs off
/// again on the "too old resource version" that follows an outage, so after the API server
/// came back a watcher took up to a minute to see changes.
///
/// [`WatchBackoff::steady`] (the operator: one replica) waits exactly that;
/// [`WatchBackoff::jittered`] (the agents: one per node) waits a random 50-100 % of it, so
/// that the agents of a large cluster do not retry in step.
#[derive(Clone, Copy, Debug)]
pub struct WatchBackoff {
    next: Duration,
    /// xorshift state; `None` is no jitter.
    seed: Option<u64>,
}

impl WatchBackoff {
    /// The first delay.
    pub const MIN: Duration = Duration::from_millis(500);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(4);

    /// Doubling from [`Self::MIN`] to [`Self::MAX`], no jitter.
    pub fn steady() -> Self {
        Self {
            next: Self::MIN,
            seed: None,
        }
    }

    /// As [`Self::steady`], each delay scaled by a random factor in [0.5, 1.0].
    pub fn jittered() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        Self {
            next: Self::MIN,
            seed: Some(u64::from(nanos ^ std::process::id()) | 1),
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = match &mut self.seed {
            None => self.next,
            Some(seed) => {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                self.next.mul_f64(0.5 + (*seed % 1000) as f64 / 2000.0)
            }
        };
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_doubles_to_the_cap_and_resets() {
        let mut b = WatchBackoff::steady();
        let first: Vec<u64> = b.by_ref().take(6).map(|d| d.as_millis() as u64).collect();
        assert_eq!(first, [500, 1000, 2000, 4000, 4000, 4000]);
        kube::runtime::utils::Backoff::reset(&mut b);
        assert_eq!(b.next(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn jitter_stays_within_half_and_whole_of_each_step() {
        let mut b = WatchBackoff::jittered();
        let steps = [500u128, 1000, 2000, 4000, 4000, 4000, 4000, 4000];
        for step in steps {
            let d = b.next().map(|d| d.as_millis()).unwrap_or_default();
            assert!(
                d >= step / 2 && d <= step,
                "{d} ms is outside [{}, {step}] ms",
                step / 2
            );
        }
    }

    #[tokio::test]
    async fn endpoints_answer_and_a_taken_port_is_an_error() {
        let ready = Arc::new(AtomicBool::new(false));
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = probe.local_addr().expect("its address");
        drop(probe);
        serve_http(
            addr,
            || async { Ok("m 1\n".to_string()) },
            ready.clone(),
            "not yet",
        )
        .await
        .expect("binds a free port");
        let get = |path: &'static str| async move {
            tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut s = std::net::TcpStream::connect(addr).expect("connects");
                let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                s.write_all(req.as_bytes()).expect("writes");
                let mut out = String::new();
                s.read_to_string(&mut out).expect("reads");
                out
            })
            .await
            .expect("the request task")
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get("/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("not yet"),
            "{r}"
        );
        ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.ends_with("ready"));
        let m = get("/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200") && m.ends_with("m 1\n"), "{m}");
        let err = serve_http(addr, || async { Err(String::new()) }, ready, "x")
            .await
            .expect_err("the port is taken");
        assert_eq!(err.addr, addr);
        assert!(err
            .to_string()
            .starts_with(&format!("cannot serve metrics on {addr}: ")));
    }
}
