//! The stored form of a node state's spec. Each program entry is its name, generation
//! and candidate variant names; the config fallbacks are listed once per node, grouped
//! by global and reason with the programs they apply to. On one kernel build the same
//! fact makes the same global fall back in every program that declares it, so the reason
//! is written once, not once per program. In memory (`AssignedProgram`) each program
//! keeps its own fallbacks, sorted by global name; the stored form rebuilds exactly that.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{AssignedProgram, BpfNodeStateSpec, ConfigFallback};

/// Per-node assignments, written by the operator.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "BpfNodeStateSpec")]
struct Stored<'a> {
    /// Programs assigned to this node. Each entry holds only what differs per node; the
    /// agent reads the variant definitions, the dispatch table and the fallback policy from
    /// the BpfPolyProgram itself, at the entry's generation.
    #[serde(default)]
    programs: Vec<StoredProgram<'a>>,
    /// The config globals that fall back on this node, each with why and the programs it
    /// falls back in (they take its `fallback` value there). Every other global takes its
    /// declared `value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    config_fallbacks: Vec<SharedFallback<'a>>,
}

/// One program assigned to a node: which variants this node may run, in order.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct StoredProgram<'a> {
    /// BpfPolyProgram name.
    name: Cow<'a, str>,
    /// BpfPolyProgram generation this assignment was computed from. The agent loads it only
    /// after it has read the program at this generation.
    generation: i64,
    /// Names of the variants eligible on this node (`spec.variants[].name`), in the order
    /// the agent tries them. The operator has checked their requirements against this node.
    variants: Cow<'a, [String]>,
}

/// A config global that falls back on one node, in the programs named.
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct SharedFallback<'a> {
    /// Global name (`spec.config[].name` of each program named).
    name: Cow<'a, str>,
    /// Why: the requirement and the node's fact.
    reason: Cow<'a, str>,
    /// The programs (`spec.programs[].name`) in which this global falls back for this reason.
    programs: Vec<Cow<'a, str>>,
}

impl Serialize for BpfNodeStateSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut groups: Vec<SharedFallback<'_>> = Vec::new();
        let mut index: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for p in &self.programs {
            for f in &p.config_fallbacks {
                let i = *index
                    .entry((f.name.as_str(), f.reason.as_str()))
                    .or_insert_with(|| {
                        groups.push(SharedFallback {
                            name: Cow::Borrowed(&f.name),
                            reason: Cow::Borrowed(&f.reason),
                            programs: Vec::new(),
                        });
                        groups.len() - 1
                    });
                groups[i].programs.push(Cow::Borrowed(&p.name));
            }
        }
        Stored {
            programs: self
                .programs
                .iter()
                .map(|p| StoredProgram {
                    name: Cow::Borrowed(&p.name),
                    generation: p.generation,
                    variants: Cow::Borrowed(&p.variants),
                })
                .collect(),
            config_fallbacks: groups,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for BpfNodeStateSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = Stored::deserialize(deserializer)?;
        let mut programs: Vec<AssignedProgram> = stored
            .programs
            .into_iter()
            .map(|p| AssignedProgram {
                name: p.name.into_owned(),
                generation: p.generation,
                variants: p.variants.into_owned(),
                config_fallbacks: Vec::new(),
            })
            .collect();
        for (i, f) in stored.config_fallbacks.iter().enumerate() {
            for name in &f.programs {
                let p = programs
                    .iter_mut()
                    .find(|p| p.name == *name)
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "configFallbacks[{i}] ({}) names program {name:?}, which programs[] does not hold",
                            f.name
                        ))
                    })?;
                p.config_fallbacks.push(ConfigFallback {
                    name: f.name.clone().into_owned(),
                    reason: f.reason.clone().into_owned(),
                });
            }
        }
        for p in &mut programs {
            p.config_fallbacks.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(Self {
            programs: programs.into_iter().map(Arc::new).collect(),
        })
    }
}

impl JsonSchema for BpfNodeStateSpec {
    fn schema_name() -> Cow<'static, str> {
        Stored::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        Stored::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(name: &str, fell: &[(&str, &str)]) -> Arc<AssignedProgram> {
        Arc::new(AssignedProgram {
            name: name.into(),
            generation: 2,
            variants: vec!["kprobe".into(), "tracepoint".into()],
            config_fallbacks: fell
                .iter()
                .map(|(n, r)| ConfigFallback {
                    name: (*n).into(),
                    reason: (*r).into(),
                })
                .collect(),
        })
    }

    const MISSING: &str = "field struct task_struct.loginuid missing on this kernel";

    #[test]
    fn a_reason_shared_by_programs_is_stored_once_and_read_back_per_program() {
        let spec = BpfNodeStateSpec {
            programs: vec![
                program(
                    "a",
                    &[
                        ("read_loginuid", MISSING),
                        ("use_ringbuf", "kernel >=5.8 kernel is 5.4.0"),
                    ],
                ),
                program("b", &[("read_loginuid", MISSING)]),
                program("c", &[]),
                program("d", &[("read_loginuid", "another reason")]),
            ],
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "programs": [
                    {"name": "a", "generation": 2, "variants": ["kprobe", "tracepoint"]},
                    {"name": "b", "generation": 2, "variants": ["kprobe", "tracepoint"]},
                    {"name": "c", "generation": 2, "variants": ["kprobe", "tracepoint"]},
                    {"name": "d", "generation": 2, "variants": ["kprobe", "tracepoint"]},
                ],
                "configFallbacks": [
                    {"name": "read_loginuid", "reason": MISSING, "programs": ["a", "b"]},
                    {"name": "use_ringbuf", "reason": "kernel >=5.8 kernel is 5.4.0", "programs": ["a"]},
                    {"name": "read_loginuid", "reason": "another reason", "programs": ["d"]},
                ],
            })
        );
        let back: BpfNodeStateSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
        assert_eq!(
            serde_json::to_string(&BpfNodeStateSpec::default()).unwrap(),
            r#"{"programs":[]}"#
        );
    }

    #[test]
    fn fallbacks_are_read_back_sorted_by_name_whatever_the_stored_order() {
        let json = serde_json::json!({
            "programs": [{"name": "a", "generation": 1, "variants": ["x"]}],
            "configFallbacks": [
                {"name": "z", "reason": "r1", "programs": ["a"]},
                {"name": "m", "reason": "r2", "programs": ["a"]},
            ],
        });
        let back: BpfNodeStateSpec = serde_json::from_value(json).unwrap();
        let names: Vec<&str> = back.programs[0]
            .config_fallbacks
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["m", "z"]);
    }

    #[test]
    fn a_fallback_for_a_program_the_node_state_does_not_hold_is_refused_by_name() {
        let json = serde_json::json!({
            "programs": [{"name": "a", "generation": 1, "variants": ["x"]}],
            "configFallbacks": [{"name": "count", "reason": "r", "programs": ["a", "ghost"]}],
        });
        let e = serde_json::from_value::<BpfNodeStateSpec>(json).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"configFallbacks[0] (count) names program "ghost", which programs[] does not hold"#
        );
    }

    /// The operator benchmark's heaviest node: 20 programs, every one with the same
    /// fallback, fits the design's 2 KB a node state.
    #[test]
    fn twenty_programs_with_one_shared_fallback_fit_in_two_kilobytes() {
        let spec = BpfNodeStateSpec {
            programs: (0..20)
                .map(|i| program(&format!("scale-{i:02}"), &[("read_loginuid", MISSING)]))
                .collect(),
        };
        let bytes = serde_json::to_string(&spec).unwrap().len();
        assert!(bytes <= 2048, "{bytes} bytes");
    }

    #[test]
    fn the_crd_schema_is_the_stored_form() {
        use kube::CustomResourceExt as _;
        let crd = serde_json::to_value(super::super::BpfNodeState::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let program = &spec["properties"]["programs"]["items"];
        assert!(program["properties"]["configFallbacks"].is_null(), "{spec}");
        assert_eq!(
            program["required"],
            serde_json::json!(["generation", "name", "variants"]),
            "{spec}"
        );
        assert_eq!(
            spec["properties"]["configFallbacks"]["items"]["required"],
            serde_json::json!(["name", "programs", "reason"]),
            "{spec}"
        );
    }
}
