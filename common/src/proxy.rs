//! The client's address behind reverse proxies. Per-IP limits key on it;
//! behind an ingress every connection comes from the ingress pod, so the
//! address the proxy saw is taken from `Forwarded` (RFC 7239) or
//! `X-Forwarded-For`, but only when the TCP peer is a trusted proxy:
//! anyone else could write those headers.
//!
//! Each proxy appends the address it received the request from, so the
//! chain is read from the right: trusted proxies are skipped, and the
//! first address that is not one is the client. An entry that is not an
//! address (`unknown`, an obfuscated name) stops the walk at the last
//! address known.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut known = peer.ip();
        if !self.trusts(known) {
            return known;
        }
        for hop in forwarded_chain(headers).iter().rev() {
            match hop {
                Some(ip) if self.trusts(*ip) => known = *ip,
                Some(ip) => return *ip,
                None => return known,
            }
        }
        known
    }
}

/// The forwarding chain, oldest first: `Forwarded`'s `for=` values when
/// that header is present, else `X-Forwarded-For`'s. `None` for an entry
/// that is not an address.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let joined = |name: &str| {
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    if let Some(forwarded) = joined("forwarded") {
        return forwarded
            .split(',')
            .map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| parse_node(v))
                })?
            })
            .collect();
    }
    joined("x-forwarded-for")
        .map(|v| v.split(',').map(parse_node).collect())
        .unwrap_or_default()
}

/// An address out of `192.0.2.1`, `192.0.2.1:80`, `"[2001:db8::1]:80"` or
/// `2001:db8::1`.
fn parse_node(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.split(']').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 443)
    }

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("net")])
    }

    #[test]
    fn untrusted_peers_are_taken_at_their_word_only() {
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            trusted().client_ip(peer("198.51.100.7"), &h),
            peer("198.51.100.7").ip()
        );
        assert_eq!(
            TrustedProxies::default().client_ip(peer("10.1.1.1"), &h),
            peer("10.1.1.1").ip()
        );
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        // A spoofed entry on the left does not help: the ingress appended
        // the address it saw.
        let h = headers(&[("x-forwarded-for", "192.0.2.66, 203.0.113.9, 10.2.0.5")]);
        assert_eq!(trusted().client_ip(peer("10.1.1.1"), &h), ip("203.0.113.9"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.2.0.5"),
        ]);
        assert_eq!(trusted().client_ip(peer("10.1.1.1"), &h), ip("203.0.113.9"));
        // Forwarded wins over X-Forwarded-For; ports and brackets are fine.
        let h = headers(&[
            (
                "forwarded",
                "for=\"[2001:db8::7]:4711\";proto=https, for=10.2.0.5:80",
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(trusted().client_ip(peer("10.1.1.1"), &h), ip("2001:db8::7"));
        // Only trusted hops: the leftmost is as far as anyone knows.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.2.0.5")]);
        assert_eq!(trusted().client_ip(peer("10.1.1.1"), &h), ip("10.9.9.9"));
        // An unknown hop stops the walk at the last known address.
        let h = headers(&[("forwarded", "for=203.0.113.9, for=unknown, for=10.2.0.5")]);
        assert_eq!(trusted().client_ip(peer("10.1.1.1"), &h), ip("10.2.0.5"));
        // No header: the proxy itself.
        assert_eq!(
            trusted().client_ip(peer("10.1.1.1"), &HeaderMap::new()),
            ip("10.1.1.1")
        );
    }
}
