//! Hand-written schema fragments where the derived ones would not be structural or would
//! miss a Kubernetes extension.

use schemars::{json_schema, Schema, SchemaGenerator};

/// `[]metav1.Condition` as a list-map keyed on `type`, so server-side apply merges conditions
/// one by one instead of replacing the list.
pub fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Standard conditions (metav1.Condition), one per type.",
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "description": "Condition type: Ready, Progressing, Degraded or Unsupported.", "maxLength": 316},
                "status": {"type": "string", "description": "True, False or Unknown.", "enum": ["True", "False", "Unknown"]},
                "observedGeneration": {"type": "integer", "format": "int64", "description": "Generation the condition was set for.", "minimum": 0},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When the status last changed."},
                "reason": {"type": "string", "description": "CamelCase reason.", "maxLength": 1024},
                "message": {"type": "string", "description": "Human-readable detail naming nodes and causes.", "maxLength": 32768}
            }
        }
    })
}

/// An integer or a percentage string such as `25%`.
pub fn int_or_percent_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Nodes changing at once after the canaries: an integer (at least 1) or a percentage of selected nodes such as `25%`.",
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}]
    })
}
