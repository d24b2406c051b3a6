//! `metav1.LabelSelector` matching against Node labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// True when `labels` match the selector; an absent or empty selector matches everything.
/// Unknown operators match nothing, so a typo never widens the selection.
pub fn matches(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else { return true };
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors() {
        let l = labels(&[("kernel", "6.1"), ("zone", "a")]);
        assert!(matches(None, &l));
        assert!(matches(Some(&LabelSelector::default()), &l));
        let sel = LabelSelector {
            match_labels: Some([("zone".to_string(), "a".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "kernel".into(),
                operator: "In".into(),
                values: Some(vec!["6.1".into(), "6.6".into()]),
            }]),
        };
        assert!(matches(Some(&sel), &l));
        assert!(!matches(Some(&sel), &labels(&[("zone", "a")])));
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "Typo".into(),
                values: None,
            }]),
            ..LabelSelector::default()
        };
        assert!(!matches(Some(&bad), &l));
    }
}
