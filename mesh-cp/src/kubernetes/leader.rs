//! Leader election among the control plane's replicas, by a coordination.k8s.io Lease. Every
//! replica serves nodes and signs CSRs; only the leader creates the CA Secret when there is
//! none, keeps the trust-bundle ConfigMap, and writes the statuses of AccessPolicies,
//! TrafficPolicies and ServiceRoutes.
//!
//! The holder renews the Lease every [`Timing::renew`]; another replica takes it over once it
//! has not been renewed for [`Timing::lease`]. Updates carry the Lease's resourceVersion, so
//! two replicas racing for it cannot both win. A leader that cannot renew steps down before
//! its Lease runs out, so two leaders never act at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a Lease holds without renewal; whole seconds, as the Lease stores it (rounded
    /// up, at least one).
    pub lease: Duration,
    /// How often the holder renews, and others look.
    pub renew: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

/// Takes part in the election for the Lease `namespace/name` as `identity` until the process
/// ends; `leader` says whether this replica leads now.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    timing: Timing,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    // As the Lease stores it; the step-down below must use the same duration others see.
    let seconds = lease_seconds(timing.lease);
    let lease = Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
    let mut last_renewed: Option<Instant> = None;
    loop {
        match attempt(&api, &name, &identity, seconds).await {
            Ok(true) => last_renewed = Some(Instant::now()),
            Ok(false) => last_renewed = None,
            Err(e) => {
                tracing::warn!(lease = %format!("{namespace}/{name}"), error = %e, "cannot read or renew the leader Lease")
            }
        }
        // Step down a renewal before the Lease could run out under us.
        let leading = last_renewed.is_some_and(|at| at.elapsed() + timing.renew < lease);
        if *leader.borrow() != leading {
            tracing::info!(identity, leading, "leadership changed");
            leader.send_replace(leading);
        }
        tokio::time::sleep(timing.renew).await;
    }
}

/// One look at the Lease (held for `seconds`): holds or takes it if it can. `Ok(true)` when
/// this replica holds it.
async fn attempt(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    seconds: i32,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let mine = spec.holder_identity.as_deref() == Some(identity);
    let held_for = spec.lease_duration_seconds.unwrap_or(seconds);
    let expired = expired(spec.renew_time.as_ref(), held_for, now);
    if !mine && !expired {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(identity.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(seconds);
    spec.renew_time = Some(MicroTime(now));
    // The resourceVersion read above makes this fail if anyone wrote the Lease since.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a Lease renewed at `renewed` and held for `seconds` has run out at `now`. In
/// milliseconds: whole seconds would let a Lease look expired up to a second early, while its
/// holder still leads.
fn expired(renewed: Option<&MicroTime>, seconds: i32, now: Timestamp) -> bool {
    renewed.is_none_or(|t| t.0.as_millisecond() + i64::from(seconds) * 1000 <= now.as_millisecond())
}

/// The Lease's duration as it stores it: whole seconds, rounded up, at least one.
fn lease_seconds(lease: Duration) -> i32 {
    let ceil = lease.as_secs() + u64::from(lease.subsec_nanos() > 0);
    i32::try_from(ceil.max(1)).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).expect("a time")
    }

    #[test]
    fn a_lease_runs_out_after_its_duration_not_at_a_second_boundary() {
        let renewed = MicroTime(at(10_999));
        // 1.001 s later, across two second boundaries: still held.
        assert!(!expired(Some(&renewed), 2, at(12_000)));
        assert!(!expired(Some(&renewed), 2, at(12_998)));
        assert!(expired(Some(&renewed), 2, at(12_999)));
        assert!(expired(None, 2, at(0)), "never renewed");
    }

    #[test]
    fn lease_durations_are_whole_seconds_rounded_up() {
        assert_eq!(lease_seconds(Duration::from_millis(600)), 1);
        assert_eq!(lease_seconds(Duration::from_secs(15)), 15);
        assert_eq!(lease_seconds(Duration::from_millis(1_500)), 2);
        assert_eq!(lease_seconds(Duration::ZERO), 1);
    }
}
