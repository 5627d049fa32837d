//! Egress policy: which addresses a sandbox may connect to.
//!
//! Two layers, as a NetworkPolicy sits on top of a node's own firewall:
//! - [`DeniedRanges`], the agent's (`--egress-deny`): loopback, link-local (with the cloud
//!   metadata address), multicast and the node's own addresses by default. No workload reaches
//!   them, whatever it lists.
//! - [`EgressRules`], the workload's (`spec.network.egress`): nothing is reachable unless a rule
//!   names it. A `host` rule admits a name only where it resolves to a public address, so a
//!   name the tenant controls cannot be pointed at the cluster's private ranges; a `cidr` rule
//!   admits the addresses it covers, private ones included.
//!
//! Every check is made on the address about to be connected to, after name resolution, so a
//! name that resolves differently on a second lookup gains nothing.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use flotilla_model::network::{DEFAULT_DENIED_RANGES, DeniedRanges};
use flotilla_model::network::{
    EgressRule as ModelRule, NetworkSpec, canonical_ip, host_matches, is_public, parse_cidr,
};
use flotilla_proto::agent::v1::EgressRule;
use ipnet::IpNet;

/// How long a name lookup for an outgoing request may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection was refused; the guest sees `destination-ip-prohibited` or
/// `http-request-denied`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No rule of the workload names this host (or port).
    #[error("{host}:{port} is not in spec.network.egress")]
    NotListed {
        /// The host or address asked for.
        host: String,
        /// The port asked for.
        port: u16,
    },
    /// The address is in one of the agent's denied ranges.
    #[error("{addr} is in the agent's denied range {range}")]
    Denied {
        /// The address.
        addr: SocketAddr,
        /// The range that holds it.
        range: IpNet,
    },
    /// A host rule admitted the name, but it resolved only to private addresses (or to
    /// addresses no rule covers).
    #[error("{host} resolved to {addrs}, which no cidr rule of spec.network.egress covers")]
    Private {
        /// The host.
        host: String,
        /// What it resolved to.
        addrs: String,
    },
    /// The name could not be resolved.
    #[error("{host}: {message}")]
    Lookup {
        /// The host.
        host: String,
        /// The resolver's error.
        message: String,
    },
}

/// A workload's egress rules, checked against the agent's denied ranges. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    rules: Arc<[Rule]>,
    denied: DeniedRanges,
}

#[derive(Debug)]
struct Rule {
    destination: Destination,
    /// Every port when empty.
    ports: Box<[u16]>,
}

#[derive(Debug)]
enum Destination {
    Host(String),
    Range(IpNet),
}

/// The rules of one workload, parsed once when it is prepared.
#[derive(Clone, Debug, Default)]
pub struct EgressRules(Arc<[Rule]>);

// === impl EgressRules ===

impl EgressRules {
    /// Parses and checks `rules` as the control plane does.
    ///
    /// # Errors
    /// A message naming the first invalid rule.
    pub fn parse(rules: &[EgressRule]) -> Result<Self, String> {
        // The model's rules, checked by the model's validation, as the control plane checks
        // them at apply.
        let network = NetworkSpec {
            egress: rules
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    let ports = rule.ports.iter().map(|&p| u16::try_from(p).ok());
                    Ok(ModelRule {
                        host: (!rule.host.is_empty()).then(|| rule.host.clone()),
                        cidr: (!rule.cidr.is_empty()).then(|| rule.cidr.clone()),
                        ports: ports.collect::<Option<_>>().ok_or_else(|| {
                            format!("spec.network.egress[{i}].ports: ports are 1-65535")
                        })?,
                    })
                })
                .collect::<Result<_, String>>()?,
        };
        let mut invalid = None;
        flotilla_model::network::validate(&network, &mut |field, message| {
            invalid.get_or_insert(format!("{field}: {message}"));
        });
        if let Some(invalid) = invalid {
            return Err(invalid);
        }
        let parsed = network
            .egress
            .into_iter()
            .map(|rule| {
                let destination = match (rule.host, &rule.cidr) {
                    (Some(host), _) => Destination::Host(host),
                    (None, Some(cidr)) => Destination::Range(parse_cidr(cidr)?),
                    (None, None) => return Err("a rule without a destination".to_string()),
                };
                Ok(Rule {
                    destination,
                    ports: rule.ports.into(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self(parsed.into()))
    }

    /// Whether the workload may connect anywhere at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These rules under the agent's `denied` ranges.
    pub fn under(&self, denied: &DeniedRanges) -> EgressPolicy {
        EgressPolicy {
            rules: self.0.clone(),
            denied: denied.clone(),
        }
    }
}

// === impl EgressPolicy ===

impl EgressPolicy {
    /// Whether a socket may connect to (or send to) `addr`: outside the denied ranges, covered
    /// by a `cidr` rule. Host rules do not apply: a socket has no name.
    ///
    /// # Errors
    /// Why not.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let addr = canonical(addr);
        if let Some(range) = self.denied.holding(addr.ip()) {
            return Err(Refusal::Denied { addr, range });
        }
        if self.range_allows(addr) {
            Ok(())
        } else {
            Err(Refusal::NotListed {
                host: addr.ip().to_string(),
                port: addr.port(),
            })
        }
    }

    /// The addresses an outgoing HTTP request to `host:port` may connect to, in resolver
    /// order. `host` is a name or an address literal (IPv6 with or without brackets).
    ///
    /// # Errors
    /// Why none: the host is not listed (the name is then not even looked up), it resolves
    /// only to denied or uncovered addresses, or the lookup failed.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            let addr = SocketAddr::new(ip, port);
            return self.check_addr(addr).map(|()| vec![canonical(addr)]);
        }
        let host = host.to_ascii_lowercase();
        let by_name = self.rules.iter().any(|rule| {
            matches!(&rule.destination, Destination::Host(pattern) if host_matches(pattern, &host))
                && rule.allows_port(port)
        });
        let by_range = self.rules.iter().any(|rule| {
            matches!(rule.destination, Destination::Range(_)) && rule.allows_port(port)
        });
        if !by_name && !by_range {
            return Err(Refusal::NotListed { host, port });
        }
        let lookup = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map(|found| found.map(|addrs| addrs.map(canonical).collect::<Vec<_>>()));
        let resolved: Vec<SocketAddr> = match lookup {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => {
                return Err(Refusal::Lookup {
                    host,
                    message: e.to_string(),
                });
            }
            Err(_) => {
                return Err(Refusal::Lookup {
                    host,
                    message: format!("no answer within {LOOKUP_TIMEOUT:?}"),
                });
            }
        };
        let allowed: Vec<SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|addr| {
                self.denied.holding(addr.ip()).is_none()
                    && (self.range_allows(*addr) || (by_name && is_public(addr.ip())))
            })
            .collect();
        if !allowed.is_empty() {
            return Ok(allowed);
        }
        // Say why, naming a denied range when that is the cause.
        if let Some((addr, range)) = resolved
            .iter()
            .find_map(|addr| self.denied.holding(addr.ip()).map(|r| (*addr, r)))
        {
            return Err(Refusal::Denied { addr, range });
        }
        Err(Refusal::Private {
            host,
            addrs: resolved
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn range_allows(&self, addr: SocketAddr) -> bool {
        self.rules.iter().any(|rule| {
            matches!(&rule.destination, Destination::Range(net) if net.contains(&addr.ip()))
                && rule.allows_port(addr.port())
        })
    }
}

// === impl Rule ===

impl Rule {
    fn allows_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.contains(&port)
    }
}

/// `addr` with its address in [`canonical_ip`] form.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical_ip(addr.ip()), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, cidr: &str, ports: &[u32]) -> EgressRule {
        EgressRule {
            host: host.into(),
            cidr: cidr.into(),
            ports: ports.to_vec(),
        }
    }

    fn policy(rules: &[EgressRule]) -> EgressPolicy {
        EgressRules::parse(rules)
            .expect("valid rules")
            .under(&DeniedRanges::defaults())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn nothing_is_reachable_without_a_rule() {
        let none = policy(&[]);
        assert!(matches!(
            none.check_addr(addr("93.184.215.14:443")),
            Err(Refusal::NotListed { .. })
        ));
    }

    #[test]
    fn denied_ranges_win_over_any_rule() {
        let greedy = policy(&[rule("", "0.0.0.0/0", &[]), rule("", "::/0", &[])]);
        for target in [
            "169.254.169.254:80",
            "127.0.0.1:7070",
            "[::1]:9090",
            "[::ffff:169.254.169.254]:80",
            "[::ffff:127.0.0.1]:8080",
            "[fd00:ec2::254]:80",
        ] {
            assert!(
                matches!(greedy.check_addr(addr(target)), Err(Refusal::Denied { .. })),
                "{target}"
            );
        }
        assert_eq!(greedy.check_addr(addr("10.1.2.3:5432")), Ok(()));
        assert_eq!(greedy.check_addr(addr("[2001:db8::1]:443")), Ok(()));
    }

    #[test]
    fn cidr_rules_cover_their_range_and_ports() {
        let db = policy(&[rule("", "10.0.0.0/24", &[5432])]);
        assert_eq!(db.check_addr(addr("10.0.0.7:5432")), Ok(()));
        assert!(db.check_addr(addr("10.0.0.7:22")).is_err());
        assert!(db.check_addr(addr("10.0.1.7:5432")).is_err());
    }

    #[test]
    fn invalid_rules_are_refused_at_the_agent_too() {
        for (bad, expected) in [
            (rule("", "", &[]), "exactly one"),
            (rule("a.com", "10.0.0.0/8", &[]), "exactly one"),
            (rule("10.0.0.1", "", &[]), ".host"),
            (rule("", "10.0.0.1/8", &[]), "host bits"),
            (rule("a.com", "", &[70_000]), "1-65535"),
        ] {
            let error = EgressRules::parse(&[bad]).expect_err("refused");
            assert!(error.contains(expected), "{error}");
        }
    }

    #[tokio::test]
    async fn names_resolve_to_checked_addresses() {
        // `localhost` resolves to loopback: denied even when a host rule names it.
        let local = policy(&[rule("localhost", "", &[])]);
        let refusal = local.resolve("localhost", 80).await.expect_err("denied");
        assert!(matches!(refusal, Refusal::Denied { .. }), "{refusal:?}");

        // A name no rule lists is not looked up.
        let other = policy(&[rule("api.example.com", "", &[443])]);
        assert_eq!(
            other.resolve("metadata.internal", 80).await,
            Err(Refusal::NotListed {
                host: "metadata.internal".into(),
                port: 80
            })
        );
        // Nor a listed name on another port.
        assert!(matches!(
            other.resolve("api.example.com", 80).await,
            Err(Refusal::NotListed { .. })
        ));

        // Address literals are checked as sockets are.
        let db = policy(&[rule("", "10.0.0.0/8", &[])]);
        assert_eq!(
            db.resolve("10.1.2.3", 80).await,
            Ok(vec![addr("10.1.2.3:80")])
        );
        assert!(matches!(
            db.resolve("[::ffff:a9fe:a9fe]", 80).await,
            Err(Refusal::Denied { .. })
        ));
    }
}
