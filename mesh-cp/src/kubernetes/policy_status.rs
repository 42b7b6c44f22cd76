//! Each AccessPolicy's status: an `Accepted` condition (`True` with the number of workloads it
//! selects, or `False` with reason `Invalid` and the parser's message) for the generation it
//! is about. Written only when it differs from what the object already says, so every
//! replica can run this and they agree instead of fighting.

use std::{collections::BTreeMap, sync::Arc};

use kube::{
    api::{DynamicObject, Patch, PatchParams},
    Api, Client, ResourceExt,
};
use mesh_model::ObjectKey;
use serde_json::{json, Value};

use super::{
    translate::{PolicyOutcome, Verdict},
    watch::access_policies,
};

pub struct Writer {
    client: Client,
}

impl Writer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Brings the status of every policy in `objects` in line with `outcomes`. A write that
    /// fails (the policy was deleted, the API is away) is logged and tried on the next round.
    pub async fn write(
        &self,
        objects: &[Arc<DynamicObject>],
        outcomes: &BTreeMap<ObjectKey, PolicyOutcome>,
    ) {
        let ar = access_policies();
        for obj in objects {
            let Some(namespace) = obj.namespace() else {
                continue;
            };
            let key = ObjectKey::new(&namespace, &obj.name_any());
            let Some(outcome) = outcomes.get(&key) else {
                continue;
            };
            let current = obj.data.get("status").cloned().unwrap_or(Value::Null);
            let Some(status) = wanted(&current, outcome) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &namespace, &ar);
            let patch = Patch::Merge(json!({ "status": status }));
            match api
                .patch_status(&key.name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => tracing::debug!(policy = %key, "status written"),
                Err(e) => {
                    tracing::warn!(policy = %key, error = %e, "cannot write the AccessPolicy's status; trying again later")
                }
            }
        }
    }
}

/// The status `outcome` calls for, or `None` if `current` already says it.
fn wanted(current: &Value, outcome: &PolicyOutcome) -> Option<Value> {
    let (accepted, reason, message, selected) = match &outcome.verdict {
        Verdict::Accepted { selected } => (
            "True",
            "Accepted",
            format!(
                "in force; selects {selected} workload{}",
                if *selected == 1 { "" } else { "s" }
            ),
            Some(*selected),
        ),
        Verdict::Invalid { reason } => ("False", "Invalid", reason.clone(), None),
    };
    let condition = &current["conditions"][0];
    let same = current["observedGeneration"].as_i64() == outcome.generation
        && current["selectedWorkloads"].as_u64() == selected.map(|s| s as u64)
        && condition["status"] == accepted
        && condition["reason"] == reason
        && condition["message"] == message.as_str();
    if same {
        return None;
    }
    // The time of the last change of `status`, not of every rewrite.
    let since = if condition["status"] == accepted {
        condition["lastTransitionTime"].clone()
    } else {
        Value::Null
    };
    let since = if since.is_null() {
        Value::String(now())
    } else {
        since
    };
    Some(json!({
        "observedGeneration": outcome.generation,
        "selectedWorkloads": selected,
        "conditions": [{
            "type": "Accepted",
            "status": accepted,
            "reason": reason,
            "message": message,
            "observedGeneration": outcome.generation,
            "lastTransitionTime": since,
        }],
    }))
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    /// The status schema of the generated AccessPolicy CRD.
    fn status_schema() -> Value {
        let crd = serde_json::to_value(mesh_model::crd::AccessPolicy::crd()).expect("CRD");
        let schema =
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"].clone();
        assert!(schema.is_object(), "the CRD has a status schema: {crd}");
        schema
    }

    /// The API server refuses a status its CRD's schema refuses: check ours against it, as
    /// stored after the merge patch (where `null` removes a field).
    fn valid_for_the_crd(patch: &Value) {
        let mut status = patch.clone();
        if let Some(fields) = status.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&status_schema())
            .expect("a JSON Schema");
        let errors: Vec<String> = validator
            .iter_errors(&status)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{status}: {errors:?}");
    }

    #[test]
    fn a_status_is_written_once_per_change() {
        let accepted = PolicyOutcome {
            generation: Some(2),
            verdict: Verdict::Accepted { selected: 3 },
        };
        let first = wanted(&Value::Null, &accepted).expect("nothing written yet");
        assert_eq!(first["conditions"][0]["status"], "True");
        assert_eq!(first["selectedWorkloads"], 3);
        assert_eq!(wanted(&first, &accepted), None, "already says it");
        let more = PolicyOutcome {
            generation: Some(2),
            verdict: Verdict::Accepted { selected: 4 },
        };
        let second = wanted(&first, &more).expect("the count changed");
        assert_eq!(
            second["conditions"][0]["lastTransitionTime"],
            first["conditions"][0]["lastTransitionTime"],
            "still Accepted: the transition time stays"
        );
        let invalid = PolicyOutcome {
            generation: Some(3),
            verdict: Verdict::Invalid {
                reason: "spec.rules: at least one rule is required".into(),
            },
        };
        let third = wanted(&second, &invalid).expect("now invalid");
        assert_eq!(third["conditions"][0]["reason"], "Invalid");
        assert_eq!(third["observedGeneration"], 3);
        assert_eq!(third["selectedWorkloads"], Value::Null);
        for status in [&first, &second, &third] {
            valid_for_the_crd(status);
        }
        // The check can fail: a condition without its required reason.
        let mut broken = first.clone();
        broken["conditions"][0]
            .as_object_mut()
            .expect("condition")
            .remove("reason");
        assert!(!jsonschema::is_valid(&status_schema(), &broken));
    }
}
