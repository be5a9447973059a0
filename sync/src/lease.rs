//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several
//! controller replicas exactly one writes. The Lease's resourceVersion makes
//! every take-over and renewal a compare-and-swap: two replicas racing for
//! an expired Lease cannot both win.
//!
//! Expiry is judged on this replica's clock from when it last saw the
//! holder's renewTime change, never by comparing clocks of two machines.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::cluster::Failure;
use crate::{Error, Result};

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The holder and renewTime last seen, and when they were first seen.
    observed: Option<(String, Option<MicroTime>, Instant)>,
}

impl Elector {
    /// A candidate `identity` for Lease `namespace/name`; a holder that does
    /// not renew within `duration` loses it.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            observed: None,
        }
    }

    /// How long a holder keeps the Lease without renewing it.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes the Lease when it is free or expired, renews it when this
    /// replica holds it. Whether this replica holds it afterwards; another
    /// replica's write in between is a `false`, not an error.
    pub async fn try_lead(&mut self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.read().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return self.write(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != self.identity && !holder.is_empty() {
            let seen = (holder.clone(), spec.renew_time.clone());
            let expired = match &self.observed {
                Some((h, renewed, since)) if (h, renewed) == (&seen.0, &seen.1) => {
                    let held = spec
                        .lease_duration_seconds
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or(self.duration, Duration::from_secs);
                    since.elapsed() > held
                }
                _ => {
                    self.observed = Some((seen.0, seen.1, Instant::now()));
                    false
                }
            };
            if !expired {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "the Lease expired: taking it over");
        }
        if holder != self.identity {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // The resourceVersion read above makes this a compare-and-swap.
        let result = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
        self.write(result)
    }

    async fn read(&self) -> Result<Option<Lease>> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| fail("read", e))
    }

    fn write(&mut self, result: kube::Result<Lease>) -> Result<bool> {
        match result {
            Ok(_) => {
                self.observed = None;
                Ok(true)
            }
            Err(e) => {
                let failure = Failure::from(e);
                if failure.is_stale() {
                    Ok(false)
                } else {
                    Err(Error::Api {
                        what: format!("write Lease {}", self.name),
                        failure,
                    })
                }
            }
        }
    }

    /// Gives the Lease up at once (on SIGTERM), so that another replica
    /// need not wait for it to expire. Nothing happens when another replica
    /// holds it.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.read().await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(fail("release", e)),
        }
    }
}

fn fail(verb: &str, e: kube::Error) -> Error {
    Error::Api {
        what: format!("{verb} the controller's Lease"),
        failure: Failure::from(e),
    }
}
