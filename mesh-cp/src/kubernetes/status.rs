//! The status of each AccessPolicy, TrafficPolicy and ServiceRoute: an `Accepted` condition
//! (`True` with what the object applies to, or `False` with reason `Invalid` and the parser's
//! message) for the generation it is about, and beside it what the object applies to: an
//! AccessPolicy's `selectedWorkloads`, or the `services` (`namespace/name`, comma-separated)
//! a TrafficPolicy or ServiceRoute binds. Written only when it differs from what the object
//! already says, so every replica can run this and they agree instead of fighting.

use std::sync::Arc;

use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    Api, Client, ResourceExt,
};
use mesh_model::ObjectKey;
use serde_json::{json, Value};

use super::{
    translate::{Applies, Outcome, Outcomes, Verdict},
    watch,
};

/// A kind whose objects carry a status of this form.
pub struct Kind {
    pub name: &'static str,
    pub resource: fn() -> ApiResource,
    /// The status field that says what an object in force applies to; removed while it is
    /// not in force.
    pub applies: &'static str,
}

pub const ACCESS_POLICY: Kind = Kind {
    name: "AccessPolicy",
    resource: watch::access_policies,
    applies: "selectedWorkloads",
};

pub const TRAFFIC_POLICY: Kind = Kind {
    name: "TrafficPolicy",
    resource: watch::traffic_policies,
    applies: "services",
};

pub const SERVICE_ROUTE: Kind = Kind {
    name: "ServiceRoute",
    resource: watch::service_routes,
    applies: "services",
};

pub struct Writer {
    client: Client,
}

impl Writer {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Brings the status of every object of `kind` in `objects` in line with `outcomes`. A
    /// write that fails (the object was deleted, the API is away) is logged and tried on the
    /// next round.
    pub async fn write(&self, kind: &Kind, objects: &[Arc<DynamicObject>], outcomes: &Outcomes) {
        let ar = (kind.resource)();
        for obj in objects {
            let Some(namespace) = obj.namespace() else {
                continue;
            };
            let key = ObjectKey::new(&namespace, &obj.name_any());
            let Some(outcome) = outcomes.get(&key) else {
                continue;
            };
            let current = obj.data.get("status").cloned().unwrap_or(Value::Null);
            let Some(status) = wanted(kind, &current, outcome) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &namespace, &ar);
            let patch = Patch::Merge(json!({ "status": status }));
            match api
                .patch_status(&key.name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => tracing::debug!(kind = kind.name, object = %key, "status written"),
                Err(e) => {
                    tracing::warn!(kind = kind.name, object = %key, error = %e, "cannot write the status; trying again later")
                }
            }
        }
    }
}

/// Services a status names before it only counts them.
const MAX_NAMED_SERVICES: usize = 10;

/// `n` and `noun`, made plural unless there is one.
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// The status field's value and the condition's message for an object in force.
fn in_force(applies: &Applies) -> (Value, String) {
    match applies {
        Applies::Workloads(n) => (
            json!(n),
            format!("in force; selects {}", count(*n, "workload")),
        ),
        Applies::Services(keys) => {
            // A mesh-wide policy binds every Service: the status names a few and counts the
            // rest, so it stays small however large the mesh.
            let mut list: Vec<String> = keys
                .iter()
                .take(MAX_NAMED_SERVICES)
                .map(ToString::to_string)
                .collect();
            if keys.len() > MAX_NAMED_SERVICES {
                list.push(format!("and {} more", keys.len() - MAX_NAMED_SERVICES));
            }
            let message = format!("in force; binds {}", count(keys.len(), "Service"));
            (Value::String(list.join(",")), message)
        }
    }
}

/// The status `outcome` calls for, or `None` if `current` already says it.
fn wanted(kind: &Kind, current: &Value, outcome: &Outcome) -> Option<Value> {
    let (accepted, reason, message, applies) = match &outcome.verdict {
        Verdict::Accepted(applies) => {
            let (value, message) = in_force(applies);
            ("True", "Accepted", message, value)
        }
        Verdict::Invalid { reason } => ("False", "Invalid", reason.clone(), Value::Null),
    };
    let condition = &current["conditions"][0];
    let same = current["observedGeneration"].as_i64() == outcome.generation
        && current[kind.applies] == applies
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
        kind.applies: applies,
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
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use mesh_model::crd;

    /// The status schema of a generated CRD.
    fn status_schema(crd: CustomResourceDefinition) -> Value {
        let crd = serde_json::to_value(crd).expect("CRD");
        let schema =
            crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"].clone();
        assert!(schema.is_object(), "the CRD has a status schema: {crd}");
        schema
    }

    /// The API server refuses a status its CRD's schema refuses: check ours against it, as
    /// stored after the merge patch (where `null` removes a field).
    fn valid_for_the_crd(crd: CustomResourceDefinition, patch: &Value) {
        let mut status = patch.clone();
        if let Some(fields) = status.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&status_schema(crd))
            .expect("a JSON Schema");
        let errors: Vec<String> = validator
            .iter_errors(&status)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{status}: {errors:?}");
    }

    fn outcome(generation: i64, verdict: Verdict) -> Outcome {
        Outcome {
            generation: Some(generation),
            verdict,
        }
    }

    fn invalid(reason: &str) -> Verdict {
        Verdict::Invalid {
            reason: reason.into(),
        }
    }

    #[test]
    fn a_status_is_written_once_per_change() {
        let accepted = outcome(2, Verdict::Accepted(Applies::Workloads(3)));
        let first = wanted(&ACCESS_POLICY, &Value::Null, &accepted).expect("nothing written yet");
        assert_eq!(first["conditions"][0]["status"], "True");
        assert_eq!(first["selectedWorkloads"], 3);
        assert_eq!(
            wanted(&ACCESS_POLICY, &first, &accepted),
            None,
            "already says it"
        );
        let more = outcome(2, Verdict::Accepted(Applies::Workloads(4)));
        let second = wanted(&ACCESS_POLICY, &first, &more).expect("the count changed");
        assert_eq!(
            second["conditions"][0]["lastTransitionTime"],
            first["conditions"][0]["lastTransitionTime"],
            "still Accepted: the transition time stays"
        );
        let bad = outcome(3, invalid("spec.rules: at least one rule is required"));
        let third = wanted(&ACCESS_POLICY, &second, &bad).expect("now invalid");
        assert_eq!(third["conditions"][0]["reason"], "Invalid");
        assert_eq!(third["observedGeneration"], 3);
        assert_eq!(third["selectedWorkloads"], Value::Null);
        for status in [&first, &second, &third] {
            valid_for_the_crd(crd::AccessPolicy::crd(), status);
        }
        // The check can fail: a condition without its required reason.
        let mut broken = first.clone();
        broken["conditions"][0]
            .as_object_mut()
            .expect("condition")
            .remove("reason");
        let schema = status_schema(crd::AccessPolicy::crd());
        assert!(!jsonschema::is_valid(&schema, &broken));
    }

    #[test]
    fn traffic_statuses_name_the_services_they_bind() {
        let services = |keys: &[(&str, &str)]| {
            let keys = keys.iter().map(|(ns, n)| ObjectKey::new(ns, n)).collect();
            Verdict::Accepted(Applies::Services(keys))
        };
        for (kind, crd) in [
            (&TRAFFIC_POLICY, crd::TrafficPolicy::crd()),
            (&SERVICE_ROUTE, crd::ServiceRoute::crd()),
        ] {
            let two = outcome(1, services(&[("shop", "payment"), ("shop", "payment-v2")]));
            let first = wanted(kind, &Value::Null, &two).expect("nothing written yet");
            assert_eq!(first["services"], "shop/payment,shop/payment-v2");
            assert_eq!(
                first["conditions"][0]["message"],
                "in force; binds 2 Services"
            );
            assert_eq!(first["selectedWorkloads"], Value::Null, "{first}");
            assert_eq!(wanted(kind, &first, &two), None, "already says it");
            let none = outcome(1, services(&[]));
            let second = wanted(kind, &first, &none).expect("the Services changed");
            assert_eq!(second["services"], "");
            let bad = outcome(2, invalid("spec.connect.maxAttempts: 0 is outside 1 to 10"));
            let third = wanted(kind, &second, &bad).expect("now invalid");
            assert_eq!(third["services"], Value::Null, "removed by the merge patch");
            assert_eq!(third["conditions"][0]["status"], "False");
            for status in [&first, &second, &third] {
                valid_for_the_crd(crd.clone(), status);
            }
        }
    }
}
