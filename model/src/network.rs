//! Network egress: the destinations a workload's sandboxes may reach (`spec.network.egress`).
//!
//! Nothing is reachable unless a rule names it, as under a default-deny NetworkPolicy. A rule
//! names a host (outgoing HTTP to that name, when it resolves to a public address) or an address
//! range (HTTP and sockets to any address in it, private ones included), and optionally ports.
//! Whatever a workload lists, the agent still refuses its own denied ranges (loopback,
//! link-local with the cloud metadata address, the node itself; see `--egress-deny`).

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Ranges denied by default to sandboxes (the agent's `--egress-deny`) and to the control
/// plane's module downloads (`--fetch-deny`): loopback, "this network", link-local
/// (169.254.169.254 and fd00:ec2::254 are cloud metadata services), multicast, broadcast.
pub const DEFAULT_DENIED_RANGES: &[&str] = &[
    "127.0.0.0/8",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::1/128",
    "::/128",
    "fe80::/10",
    "fd00:ec2::254/128",
    "ff00::/8",
];

/// Ranges that are not public (RFC 1918, shared address space, benchmarking, unique local).
pub const PRIVATE_RANGES: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "198.18.0.0/15",
    "fc00::/7",
];

/// The ranges of [`DEFAULT_DENIED_RANGES`], parsed.
fn default_denied_ranges() -> Vec<IpNet> {
    parse_all(DEFAULT_DENIED_RANGES)
}

/// Address ranges that are never connected to: the agent's for sandboxes (`--egress-deny`),
/// the control plane's for module downloads (`--fetch-deny`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeniedRanges(Arc<[IpNet]>);

impl DeniedRanges {
    /// The given ranges.
    pub fn new(ranges: impl IntoIterator<Item = IpNet>) -> Self {
        Self(ranges.into_iter().collect())
    }

    /// [`DEFAULT_DENIED_RANGES`].
    pub fn defaults() -> Self {
        Self::new(default_denied_ranges())
    }

    /// The denied range that holds `ip` (in [`canonical_ip`] form), if any.
    pub fn holding(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = canonical_ip(ip);
        self.0.iter().find(|range| range.contains(&ip)).copied()
    }
}

impl Default for DeniedRanges {
    fn default() -> Self {
        Self::defaults()
    }
}

/// Whether `ip` is neither private nor in a default-denied range.
pub fn is_public(ip: IpAddr) -> bool {
    static NOT_PUBLIC: LazyLock<Vec<IpNet>> = LazyLock::new(|| {
        parse_all(PRIVATE_RANGES)
            .into_iter()
            .chain(default_denied_ranges())
            .collect()
    });
    !NOT_PUBLIC.iter().any(|range| range.contains(&ip))
}

/// `ip`, with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it is, so
/// that no range check can be passed by writing an address another way.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Parses an `--egress-deny` or `--fetch-deny` value: a range (`10.0.0.0/8`) or one address
/// (`10.0.0.7`, standing for `10.0.0.7/32`).
///
/// # Errors
/// A message for anything else.
pub fn parse_denied_range(value: &str) -> Result<IpNet, String> {
    value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{value:?}: must be an address or a range such as 10.0.0.0/8"))
}

fn parse_all(ranges: &[&str]) -> Vec<IpNet> {
    ranges.iter().filter_map(|r| r.parse().ok()).collect()
}

/// Most egress rules one workload may list.
pub const MAX_EGRESS_RULES: usize = 64;
/// Most ports one egress rule may list.
pub const MAX_EGRESS_PORTS: usize = 32;

/// How a workload's sandboxes reach the network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct NetworkSpec {
    /// Destinations sandboxes may connect to; none when empty (the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

/// One allowed destination: exactly one of `host` and `cidr`, on `ports` (all when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
pub struct EgressRule {
    /// A host name (`api.example.com`) or all names under one (`*.example.com`), for outgoing
    /// HTTP requests; allowed only where the name resolves to a public address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// An address range (`203.0.113.0/24`, `10.0.0.7/32`, `2001:db8::/32`), for HTTP requests
    /// and sockets; private ranges are reachable only through such a rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Destination ports; every port when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "kube", schemars(inner(range(min = 1, max = 65535))))]
    pub ports: Vec<u16>,
}

/// Why an egress host pattern is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?}: must be a lower-case DNS name such as api.example.com, optionally *.-prefixed")]
pub struct InvalidHostPattern(pub String);

/// Checks a host pattern: a lower-case DNS name, or `*.` and one.
///
/// # Errors
/// [`InvalidHostPattern`] for anything else, an IP address included (use `cidr`).
pub fn validate_host_pattern(pattern: &str) -> Result<(), InvalidHostPattern> {
    let name = pattern.strip_prefix("*.").unwrap_or(pattern);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(label_ok)
        && name.parse::<IpAddr>().is_err()
        // An all-numeric last label reads as an address to some resolvers.
        && !name.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if valid {
        Ok(())
    } else {
        Err(InvalidHostPattern(pattern.to_string()))
    }
}

/// Whether `host` (lower case, without port) matches `pattern`: equal, or, for `*.suffix`, a
/// name with at least one more label before `.suffix`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|rest| rest.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty()),
        None => host == pattern,
    }
}

/// Parses a CIDR whose host bits are zero (`10.0.0.0/8`, not `10.1.2.3/8`).
///
/// # Errors
/// A message for anything else.
pub fn parse_cidr(cidr: &str) -> Result<IpNet, String> {
    let net: IpNet = cidr
        .parse()
        .map_err(|_| format!("{cidr:?}: must be an address range such as 10.0.0.0/8"))?;
    if net.trunc() != net {
        return Err(format!(
            "{cidr:?}: has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Checks `network`, calling `fail` with the field path and message of each invalid part.
pub fn validate(network: &NetworkSpec, fail: &mut impl FnMut(&str, String)) {
    if network.egress.len() > MAX_EGRESS_RULES {
        fail(
            "spec.network.egress",
            format!("at most {MAX_EGRESS_RULES} rules"),
        );
    }
    for (i, rule) in network.egress.iter().enumerate() {
        let field = format!("spec.network.egress[{i}]");
        match (&rule.host, &rule.cidr) {
            (Some(host), None) => {
                if let Err(e) = validate_host_pattern(host) {
                    fail(&format!("{field}.host"), e.to_string());
                }
            }
            (None, Some(cidr)) => {
                if let Err(message) = parse_cidr(cidr) {
                    fail(&format!("{field}.cidr"), message);
                }
            }
            _ => fail(&field, "must set exactly one of host and cidr".into()),
        }
        if rule.ports.len() > MAX_EGRESS_PORTS {
            fail(
                &format!("{field}.ports"),
                format!("at most {MAX_EGRESS_PORTS} ports"),
            );
        }
        if rule.ports.contains(&0) {
            fail(&format!("{field}.ports"), "ports are 1-65535".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(network: &NetworkSpec) -> Vec<String> {
        let mut errors = Vec::new();
        validate(network, &mut |field, message| {
            errors.push(format!("{field}: {message}"));
        });
        errors
    }

    fn rule(host: Option<&str>, cidr: Option<&str>, ports: &[u16]) -> EgressRule {
        EgressRule {
            host: host.map(str::to_string),
            cidr: cidr.map(str::to_string),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn host_patterns_match_whole_labels() {
        assert!(host_matches("api.example.com", "api.example.com"));
        assert!(host_matches("api.example.com", "api.example.com."));
        assert!(!host_matches("api.example.com", "xapi.example.com"));
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
    }

    #[test]
    fn rules_need_one_valid_destination_and_real_ports() {
        let ok = NetworkSpec {
            egress: vec![
                rule(Some("api.example.com"), None, &[443]),
                rule(Some("*.example.org"), None, &[]),
                rule(None, Some("10.0.0.0/8"), &[5432]),
                rule(None, Some("2001:db8::/32"), &[]),
            ],
        };
        assert_eq!(errors(&ok), Vec::<String>::new());
        let bad = NetworkSpec {
            egress: vec![
                rule(None, None, &[]),
                rule(Some("a.com"), Some("10.0.0.0/8"), &[]),
                rule(Some("169.254.169.254"), None, &[]),
                rule(Some("API.example.com"), None, &[]),
                rule(Some("*"), None, &[]),
                rule(None, Some("10.1.2.3/8"), &[]),
                rule(None, Some("metadata"), &[]),
                rule(Some("a.com"), None, &[0]),
            ],
        };
        let errors = errors(&bad);
        assert_eq!(errors.len(), 8, "{errors:#?}");
        assert!(errors[0].starts_with("spec.network.egress[0]: must set exactly one"));
        assert!(errors[2].contains("egress[2].host"), "{}", errors[2]);
        assert!(
            errors[5].contains("did you mean 10.0.0.0/8"),
            "{}",
            errors[5]
        );
        assert!(errors[7].contains("egress[7].ports"), "{}", errors[7]);
    }

    #[test]
    fn private_and_denied_ranges_are_not_public() {
        for ip in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
            "127.0.0.1",
            "169.254.169.254",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.215.14", "2606:2800::1", "172.32.0.1"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
        assert_eq!(
            canonical_ip("::ffff:169.254.169.254".parse().expect("ip")),
            "169.254.169.254".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(
            parse_denied_range("10.0.0.7").map(|n| n.to_string()),
            Ok("10.0.0.7/32".into())
        );
        assert!(parse_denied_range("metadata").is_err());
    }

    #[test]
    fn rule_count_is_bounded() {
        let many = NetworkSpec {
            egress: vec![rule(None, Some("10.0.0.0/8"), &[]); MAX_EGRESS_RULES + 1],
        };
        assert_eq!(
            errors(&many),
            vec![format!(
                "spec.network.egress: at most {MAX_EGRESS_RULES} rules"
            )]
        );
    }
}
