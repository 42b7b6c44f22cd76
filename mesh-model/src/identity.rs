//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

/// A workload identity as carried in the URI SAN of its X.509 SVID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri:?} is not a Mycel SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
pub struct ParseSpiffeIdError {
    uri: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = ParseSpiffeIdError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let err = || ParseSpiffeIdError {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa]
                if is_trust_domain(td) && crate::is_dns_label(ns) && is_sa_name(sa) =>
            {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(err()),
        }
    }
}

/// Trust domains are lower-case DNS-like names (SPIFFE allows a-z, 0-9, '.', '-', '_').
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// Service-account names follow Kubernetes: DNS subdomains (labels joined by dots).
pub fn is_sa_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::new("cluster.local", "shop", "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/web/x",
            "https://cluster.local/ns/shop/sa/web",
            "spiffe://Cluster/ns/shop/sa/web",
            "spiffe://cluster.local/ns/Shop/sa/web",
            "spiffe:///ns/shop/sa/web",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
