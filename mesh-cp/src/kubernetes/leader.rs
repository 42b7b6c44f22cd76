//! Leader election among the control plane's replicas, by a coordination.k8s.io Lease. Every
//! replica serves nodes and signs CSRs; only the leader creates the CA Secret when there is
//! none, keeps the trust-bundle ConfigMap, and writes AccessPolicy statuses.
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
    /// How long a Lease holds without renewal.
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
    let mut last_renewed: Option<Instant> = None;
    loop {
        match attempt(&api, &name, &identity, timing).await {
            Ok(true) => last_renewed = Some(Instant::now()),
            Ok(false) => last_renewed = None,
            Err(e) => {
                tracing::warn!(lease = %format!("{namespace}/{name}"), error = %e, "cannot read or renew the leader Lease")
            }
        }
        // Step down a renewal before the Lease could run out under us.
        let leading = last_renewed.is_some_and(|at| at.elapsed() + timing.renew < timing.lease);
        if *leader.borrow() != leading {
            tracing::info!(identity, leading, "leadership changed");
            leader.send_replace(leading);
        }
        tokio::time::sleep(timing.renew).await;
    }
}

/// One look at the Lease: holds or takes it if it can. `Ok(true)` when this replica holds it.
async fn attempt(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    timing: Timing,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let seconds = i32::try_from(timing.lease.as_secs()).unwrap_or(i32::MAX);
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
    let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(seconds));
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| t.0.as_second() + held_for <= now.as_second());
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
