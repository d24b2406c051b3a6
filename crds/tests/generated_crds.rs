//! The committed CRD YAML (crds/ and the chart's copy) must match the types. Run `make crds`
//! after changing an API type.

#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn committed_crds_are_up_to_date() {
    let want = bpfpoly_crds::crds_yaml().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for rel in [
        "crds/bpfpoly.io_crds.yaml",
        "charts/bpfpoly/crds/bpfpoly.io_crds.yaml",
    ] {
        let have = std::fs::read_to_string(root.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}; run `make crds`"));
        assert!(have == want, "{rel} is stale; run `make crds`");
    }
}

#[test]
fn every_schema_property_has_a_description() {
    fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, child) in props {
                let p = format!("{path}.{k}");
                if child.get("description").is_none()
                    && !["apiVersion", "kind", "metadata"].contains(&k.as_str())
                {
                    missing.push(p.clone());
                }
                walk(&p, child, missing);
            }
        }
        if let Some(items) = v.get("items") {
            walk(path, items, missing);
        }
    }
    let mut missing = Vec::new();
    for crd in bpfpoly_crds::crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let kind = crd.spec.names.kind.clone();
        for ver in v["spec"]["versions"].as_array().unwrap() {
            walk(&kind, &ver["schema"]["openAPIV3Schema"], &mut missing);
        }
    }
    assert!(
        missing.is_empty(),
        "fields without description: {missing:#?}"
    );
}
