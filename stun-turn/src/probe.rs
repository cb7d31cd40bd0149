//! `floe stun-probe`: learns this host's NAT mapping and filtering
//! behaviour from a STUN server that supports NAT behaviour discovery
//! (RFC 5780 §4.3 and §4.4; floe's with `--alt-ip`, or coturn's).
//!
//! The tests' logic ([`mapping`], [`filtering`], [`request`], [`parse`])
//! is plain functions; [`probe`] only sends and waits, each test a bounded
//! number of tries. Mapping and filtering use separate sockets: the
//! mapping tests send to the server's alternate address, which would open
//! a filtering NAT to exactly the answers the filtering tests look for.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use stun::addr::MappedAddress;
use stun::attributes::{ATTR_CHANGE_REQUEST, ATTR_OTHER_ADDRESS, ATTR_RESPONSE_ORIGIN};
use stun::fingerprint::FINGERPRINT;
use stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Getter, Message, Setter};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;

use crate::behavior::{CHANGE_IP, CHANGE_PORT};

/// Flags of `floe stun-probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeConfig {
    /// STUN server with NAT behaviour discovery (`host:port`).
    #[arg(long, env = "FLOE_PROBE_SERVER")]
    pub server: String,

    /// How long to wait for each answer before sending again, ms (three
    /// tries per test).
    #[arg(long, env = "FLOE_PROBE_WAIT_MS", default_value_t = 400)]
    pub wait_ms: u64,

    /// Print the result as JSON.
    #[arg(long, env = "FLOE_PROBE_JSON")]
    pub json: bool,
}

/// How a NAT maps a host's address and port to a public one (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No NAT: the server sees the host's own address.
    NoNat,
    /// The same public address for every destination ("cone").
    EndpointIndependent,
    /// A new public address per destination IP.
    AddressDependent,
    /// A new public address per destination IP and port ("symmetric").
    AddressAndPortDependent,
}

/// Which sources a NAT lets through to a mapped address (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone.
    EndpointIndependent,
    /// Only IPs the host sent to.
    AddressDependent,
    /// Only IPs and ports the host sent to.
    AddressAndPortDependent,
}

/// What the probe learned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatBehavior {
    pub server: SocketAddr,
    pub other_address: SocketAddr,
    pub local: SocketAddr,
    pub mapped: SocketAddr,
    pub mapping: Mapping,
    pub filtering: Filtering,
}

impl NatBehavior {
    /// "cone" or "symmetric", as NATs are usually called.
    pub fn kind(&self) -> &'static str {
        match self.mapping {
            Mapping::NoNat => "no NAT",
            Mapping::EndpointIndependent => "cone",
            Mapping::AddressDependent | Mapping::AddressAndPortDependent => "symmetric",
        }
    }
}

impl fmt::Display for NatBehavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "NAT behaviour against {} (other address {}):",
            self.server, self.other_address
        )?;
        writeln!(f, "  local address   {}", self.local)?;
        writeln!(f, "  mapped address  {}", self.mapped)?;
        writeln!(f, "  mapping         {:?}", self.mapping)?;
        writeln!(f, "  filtering       {:?}", self.filtering)?;
        writeln!(f, "  in short        {}", self.kind())
    }
}

/// Why the probe could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("{0} did not answer a Binding request")]
    NoAnswer(SocketAddr),
    #[error(
        "{0} does not support NAT behaviour discovery (no OTHER-ADDRESS in its answer; \
         floe needs --alt-ip)"
    )]
    NoDiscovery(SocketAddr),
    #[error("UDP: {0}")]
    Io(#[from] std::io::Error),
}

/// An answer to a Binding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Where the answer came from (the datagram's source).
    pub source: SocketAddr,
    pub mapped: SocketAddr,
    pub other: Option<SocketAddr>,
    pub origin: Option<SocketAddr>,
}

/// A Binding request with CHANGE-REQUEST `flags` (none when 0), and its
/// transaction id.
pub fn request(flags: u32) -> (Vec<u8>, [u8; 12]) {
    struct Change(u32);
    impl Setter for Change {
        fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
            m.add(ATTR_CHANGE_REQUEST, &self.0.to_be_bytes());
            Ok(())
        }
    }
    let mut m = Message::new();
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(BINDING_REQUEST),
        Box::new(stun::agent::TransactionId::new()),
    ];
    if flags != 0 {
        setters.push(Box::new(Change(flags)));
    }
    setters.push(Box::new(FINGERPRINT));
    // Building from these setters cannot fail.
    let _ = m.build(&setters);
    (m.raw, m.transaction_id.0)
}

/// The answer in `raw`, from `source`, if it is a Binding success for
/// transaction `id`.
pub fn parse(raw: &[u8], source: SocketAddr, id: &[u8; 12]) -> Option<Answer> {
    let mut m = Message::new();
    m.raw = raw.to_vec();
    m.decode().ok()?;
    if m.typ != BINDING_SUCCESS || &m.transaction_id.0 != id {
        return None;
    }
    let mut x = XorMappedAddress::default();
    x.get_from(&m).ok()?;
    let address = |t| {
        let mut a = MappedAddress::default();
        a.get_from_as(&m, t)
            .ok()
            .map(|()| SocketAddr::new(a.ip, a.port))
    };
    Some(Answer {
        source,
        mapped: SocketAddr::new(x.ip, x.port),
        other: address(ATTR_OTHER_ADDRESS),
        origin: address(ATTR_RESPONSE_ORIGIN),
    })
}

/// Mapping behaviour from the mapped addresses seen by the primary
/// address (test I), the alternate IP with the primary port (test II) and
/// the alternate IP and port (test III; needed only when I and II differ).
pub fn mapping(
    local: SocketAddr,
    first: SocketAddr,
    second: SocketAddr,
    third: Option<SocketAddr>,
) -> Mapping {
    if first == local {
        Mapping::NoNat
    } else if second == first {
        Mapping::EndpointIndependent
    } else if third == Some(second) {
        Mapping::AddressDependent
    } else {
        Mapping::AddressAndPortDependent
    }
}

/// Filtering behaviour from whether answers from the other IP and port
/// (test II) and from the other port only (test III) came through.
pub fn filtering(other_ip_and_port: bool, other_port: bool) -> Filtering {
    if other_ip_and_port {
        Filtering::EndpointIndependent
    } else if other_port {
        Filtering::AddressDependent
    } else {
        Filtering::AddressAndPortDependent
    }
}

/// Sends a Binding request (CHANGE-REQUEST `flags`) to `to` from `socket`
/// up to three times; the answer, if one came from `expect_from` (any
/// source when `None`).
async fn test(
    socket: &UdpSocket,
    to: SocketAddr,
    flags: u32,
    expect_from: Option<SocketAddr>,
    wait: Duration,
) -> std::io::Result<Option<Answer>> {
    let (req, id) = request(flags);
    let mut buf = [0u8; 1500];
    for _ in 0..3 {
        socket.send_to(&req, to).await?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(r) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
            let (n, source) = r?;
            if let Some(answer) = parse(&buf[..n], source, &id)
                && expect_from.is_none_or(|e| e == source)
            {
                return Ok(Some(answer));
            }
        }
    }
    Ok(None)
}

/// A UDP socket of the family of `server`, and its local address as the
/// server would see it without NAT.
async fn socket_towards(server: SocketAddr) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let any: SocketAddr = if server.is_ipv4() {
        (IpAddr::from([0, 0, 0, 0]), 0).into()
    } else {
        (IpAddr::from([0u16; 8]), 0).into()
    };
    let socket = UdpSocket::bind(any).await?;
    // The source IP the kernel picks towards the server, from a connected
    // twin (the probe's own socket must take answers from anywhere).
    let twin = UdpSocket::bind(any).await?;
    twin.connect(server).await?;
    let local = SocketAddr::new(twin.local_addr()?.ip(), socket.local_addr()?.port());
    Ok((socket, local))
}

/// Runs the mapping and filtering tests against `config.server`.
pub async fn probe(config: &ProbeConfig) -> Result<NatBehavior, ProbeError> {
    let server = tokio::net::lookup_host(&config.server)
        .await
        .map_err(|e| ProbeError::Resolve(config.server.clone(), e.to_string()))?
        .next()
        .ok_or_else(|| ProbeError::Resolve(config.server.clone(), "no address".into()))?;
    let wait = Duration::from_millis(config.wait_ms.clamp(50, 10_000));

    let (socket, local) = socket_towards(server).await?;
    let first = test(&socket, server, 0, None, wait)
        .await?
        .ok_or(ProbeError::NoAnswer(server))?;
    let other = first.other.ok_or(ProbeError::NoDiscovery(server))?;
    let alt_ip = SocketAddr::new(other.ip(), server.port());
    let mapping = if first.mapped == local {
        Mapping::NoNat
    } else {
        let second = test(&socket, alt_ip, 0, None, wait)
            .await?
            .ok_or(ProbeError::NoAnswer(alt_ip))?;
        let third = if second.mapped == first.mapped {
            None
        } else {
            let third = test(&socket, other, 0, None, wait)
                .await?
                .ok_or(ProbeError::NoAnswer(other))?;
            Some(third.mapped)
        };
        mapping(local, first.mapped, second.mapped, third)
    };

    let (fresh, _) = socket_towards(server).await?;
    test(&fresh, server, 0, None, wait)
        .await?
        .ok_or(ProbeError::NoAnswer(server))?;
    let both = test(&fresh, server, CHANGE_IP | CHANGE_PORT, Some(other), wait).await?;
    let port_only = if both.is_some() {
        None
    } else {
        let from = SocketAddr::new(server.ip(), other.port());
        test(&fresh, server, CHANGE_PORT, Some(from), wait).await?
    };
    Ok(NatBehavior {
        server,
        other_address: other,
        local,
        mapped: first.mapped,
        mapping,
        filtering: filtering(both.is_some(), port_only.is_some()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn mapping_follows_rfc_5780() {
        let local = a("198.51.100.10:5000");
        let x = a("203.0.113.21:5000");
        let y = a("203.0.113.21:6000");
        let z = a("203.0.113.21:7000");
        assert_eq!(mapping(local, local, local, None), Mapping::NoNat);
        assert_eq!(mapping(local, x, x, None), Mapping::EndpointIndependent);
        assert_eq!(mapping(local, x, y, Some(y)), Mapping::AddressDependent);
        assert_eq!(
            mapping(local, x, y, Some(z)),
            Mapping::AddressAndPortDependent
        );
    }

    #[test]
    fn filtering_follows_rfc_5780() {
        assert_eq!(filtering(true, false), Filtering::EndpointIndependent);
        assert_eq!(filtering(false, true), Filtering::AddressDependent);
        assert_eq!(filtering(false, false), Filtering::AddressAndPortDependent);
    }

    #[test]
    fn requests_and_answers_round_trip_through_the_server_logic() {
        let addrs = crate::behavior::Addresses {
            primary: a("203.0.113.10:3478"),
            alt_ip: "203.0.113.11".parse().expect("ip"),
            alt_port: 3479,
        };
        let client = a("198.51.100.10:5000");
        let (req, id) = request(CHANGE_PORT);
        let reply = crate::behavior::answer(&addrs, &req, addrs.primary, client).expect("reply");
        let answer = parse(&reply.bytes, reply.from, &id).expect("parses");
        assert_eq!(answer.source, a("203.0.113.10:3479"));
        assert_eq!(answer.mapped, client);
        assert_eq!(answer.other, Some(a("203.0.113.11:3479")));
        assert_eq!(answer.origin, Some(answer.source));
        // Another transaction's answer is not this one's.
        assert_eq!(parse(&reply.bytes, reply.from, &[0; 12]), None);
    }
}
