//! `bpfpoly-operator unload-all`: deletes every `BpfPolyProgram` and waits until all are gone.
//! Each program's finalizer (run by the leading operator) unloads it from every node before
//! the object goes, so when this returns nothing bpfpoly loaded is left in any kernel. The
//! chart's pre-delete hook runs it, so `helm uninstall` unloads the programs while the
//! operator and the agents still run.

use std::time::{Duration, Instant};

use bpfpoly_crds::BpfPolyProgram;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};

/// Deletes every program and polls until none is left or `timeout` passes. Progress goes to
/// stderr. Returns the number of programs deleted; on timeout, an error naming each program
/// still there with its finalizers.
pub async fn unload_all(client: &Client, timeout: Duration) -> Result<usize, String> {
    let api = Api::<BpfPolyProgram>::all(client.clone());
    let lp = ListParams::default();
    let list = api
        .list(&lp)
        .await
        .map_err(|e| format!("listing BpfPolyPrograms: {e}"))?;
    let mut deleted = 0;
    for p in &list.items {
        let name = p.name_any();
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                deleted += 1;
                eprintln!("deleting BpfPolyProgram {name}");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(format!("deleting BpfPolyProgram {name}: {e}")),
        }
    }
    let start = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let left = api
            .list(&lp)
            .await
            .map_err(|e| format!("listing BpfPolyPrograms: {e}"))?;
        if left.items.is_empty() {
            eprintln!(
                "all programs unloaded and deleted ({deleted} deleted, {:.1} s)",
                start.elapsed().as_secs_f64()
            );
            return Ok(deleted);
        }
        let names: Vec<String> = left
            .items
            .iter()
            .map(|p| format!("{} (finalizers {:?})", p.name_any(), p.finalizers()))
            .collect();
        if start.elapsed() >= timeout {
            return Err(format!(
                "after {} s, still there: {}",
                timeout.as_secs(),
                names.join(", ")
            ));
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("waiting for the operator to unload: {}", names.join(", "));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
