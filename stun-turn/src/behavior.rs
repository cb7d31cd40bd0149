//! NAT behaviour discovery (RFC 5780), server side: with a second IP
//! address (`--alt-ip`) and a second port (`--alt-port`) the STUN server
//! listens on four addresses, tells a client the one that differs in both
//! (OTHER-ADDRESS) and where each answer comes from (RESPONSE-ORIGIN), and
//! answers from another address on request (CHANGE-REQUEST) or to another
//! port of the client (RESPONSE-PORT). A client compares what it sees to
//! learn its NAT's mapping and filtering behaviour (`floe stun-probe`).
//!
//! [`answer`] is a plain function of (request, the address it reached,
//! its source) to a reply and the addresses it goes between; the server's
//! UDP loops send it from the right socket.

use std::net::{IpAddr, SocketAddr};

use stun::addr::MappedAddress;
use stun::attributes::{
    ATTR_CHANGE_REQUEST, ATTR_OTHER_ADDRESS, ATTR_RESPONSE_ORIGIN, ATTR_RESPONSE_PORT, AttrType,
};
use stun::message::{Message, Setter};

use crate::binding;

/// CHANGE-REQUEST flag: answer from the other IP address.
pub const CHANGE_IP: u32 = 0x04;
/// CHANGE-REQUEST flag: answer from the other port.
pub const CHANGE_PORT: u32 = 0x02;

/// The four addresses of a discovery server: the primary one and every
/// mix of it with the alternate IP and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub primary: SocketAddr,
    pub alt_ip: IpAddr,
    pub alt_port: u16,
}

impl Addresses {
    /// The four listening addresses, primary first.
    pub fn all(&self) -> [SocketAddr; 4] {
        let (ip, port) = (self.primary.ip(), self.primary.port());
        [
            self.primary,
            SocketAddr::new(ip, self.alt_port),
            SocketAddr::new(self.alt_ip, port),
            SocketAddr::new(self.alt_ip, self.alt_port),
        ]
    }

    fn flip_ip(&self, ip: IpAddr) -> IpAddr {
        if ip == self.alt_ip {
            self.primary.ip()
        } else {
            self.alt_ip
        }
    }

    fn flip_port(&self, port: u16) -> u16 {
        if port == self.alt_port {
            self.primary.port()
        } else {
            self.alt_port
        }
    }

    /// OTHER-ADDRESS for a request that reached `local`: the address that
    /// differs from it in both IP and port.
    pub fn other(&self, local: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.flip_ip(local.ip()), self.flip_port(local.port()))
    }

    /// Where the answer to a request that reached `local` comes from, for
    /// CHANGE-REQUEST `flags`.
    pub fn origin(&self, local: SocketAddr, flags: u32) -> SocketAddr {
        let ip = if flags & CHANGE_IP != 0 {
            self.flip_ip(local.ip())
        } else {
            local.ip()
        };
        let port = if flags & CHANGE_PORT != 0 {
            self.flip_port(local.port())
        } else {
            local.port()
        };
        SocketAddr::new(ip, port)
    }
}

/// An answer and the addresses it goes between.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// The server address to send from (one of [`Addresses::all`]).
    pub from: SocketAddr,
    pub to: SocketAddr,
}

/// Comprehension-required attributes a discovery Binding request may
/// carry: the plain Binding ones plus CHANGE-REQUEST and RESPONSE-PORT.
fn understood(t: AttrType) -> bool {
    binding::understood_in_binding(t) || t == ATTR_CHANGE_REQUEST || t == ATTR_RESPONSE_PORT
}

/// A 32-bit attribute value (CHANGE-REQUEST), or `Err` when malformed.
fn flags(req: &Message) -> Result<u32, ()> {
    match req.get(ATTR_CHANGE_REQUEST) {
        Err(_) => Ok(0),
        Ok(v) if v.len() == 4 => Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
        Ok(_) => Err(()),
    }
}

/// RESPONSE-PORT (a port and two bytes of padding), or `Err` when
/// malformed or zero.
fn response_port(req: &Message) -> Result<Option<u16>, ()> {
    match req.get(ATTR_RESPONSE_PORT) {
        Err(_) => Ok(None),
        Ok(v) if v.len() == 4 && (v[0], v[1]) != (0, 0) => {
            Ok(Some(u16::from_be_bytes([v[0], v[1]])))
        }
        Ok(_) => Err(()),
    }
}

/// An address attribute of type `typ` (OTHER-ADDRESS, RESPONSE-ORIGIN).
struct AddressAttr(AttrType, SocketAddr);

impl Setter for AddressAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        MappedAddress {
            ip: self.1.ip(),
            port: self.1.port(),
        }
        .add_to_as(m, self.0)
    }
}

/// Answers a Binding request that reached `local` (one of `addrs`) from
/// `from`; `None` for anything to discard silently (not a Binding
/// request, a bad FINGERPRINT).
pub fn answer(addrs: &Addresses, raw: &[u8], local: SocketAddr, from: SocketAddr) -> Option<Reply> {
    if !binding::looks_like_stun(raw) {
        return None;
    }
    let mut req = Message::new();
    req.raw.clear();
    req.raw.extend_from_slice(raw);
    req.decode().ok()?;
    if !binding::is_answerable(&req) {
        return None;
    }
    let mut out = Message::new();
    out.transaction_id = req.transaction_id;
    let unknown = binding::unknown_attributes(&req, |a| understood(a.typ));
    let built = if !unknown.is_empty() {
        binding::unknown_attribute(&mut out, unknown)
            .ok()
            .map(|()| (local, from))
    } else {
        match (flags(&req), response_port(&req)) {
            (Ok(flags), Ok(port)) => {
                let origin = addrs.origin(local, flags);
                let to = port.map_or(from, |p| SocketAddr::new(from.ip(), p));
                binding::success(
                    &mut out,
                    from,
                    vec![
                        Box::new(AddressAttr(ATTR_RESPONSE_ORIGIN, origin)),
                        Box::new(AddressAttr(ATTR_OTHER_ADDRESS, addrs.other(local))),
                    ],
                )
                .ok()
                .map(|()| (origin, to))
            }
            _ => binding::error(
                &mut out,
                stun::error_code::CODE_BAD_REQUEST,
                "Bad CHANGE-REQUEST or RESPONSE-PORT",
                Vec::new(),
            )
            .ok()
            .map(|()| (local, from)),
        }
    };
    built.map(|(from_addr, to)| Reply {
        bytes: out.raw,
        from: from_addr,
        to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::fingerprint::FINGERPRINT;
    use stun::message::{BINDING_ERROR, BINDING_REQUEST, BINDING_SUCCESS, Getter};
    use stun::xoraddr::XorMappedAddress;

    fn addrs() -> Addresses {
        Addresses {
            primary: "203.0.113.10:3478".parse().expect("addr"),
            alt_ip: "203.0.113.11".parse().expect("ip"),
            alt_port: 3479,
        }
    }

    struct Raw(AttrType, Vec<u8>);
    impl Setter for Raw {
        fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
            m.add(self.0, &self.1);
            Ok(())
        }
    }

    fn request(extra: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut m = Message::new();
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ];
        setters.extend(extra);
        setters.push(Box::new(FINGERPRINT));
        m.build(&setters).expect("build");
        m.raw
    }

    fn change(flags: u32) -> Box<dyn Setter> {
        Box::new(Raw(ATTR_CHANGE_REQUEST, flags.to_be_bytes().to_vec()))
    }

    fn decode(raw: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = raw.to_vec();
        m.decode().expect("decodes");
        m
    }

    fn address(m: &Message, t: AttrType) -> SocketAddr {
        let mut a = MappedAddress::default();
        a.get_from_as(m, t).expect("attribute");
        SocketAddr::new(a.ip, a.port)
    }

    #[test]
    fn other_address_differs_in_both_and_origin_follows_the_flags() {
        let a = addrs();
        let [p, p_port, ip_p, alt] = a.all();
        assert_eq!(a.other(p), alt);
        assert_eq!(a.other(alt), p);
        assert_eq!(a.other(p_port), ip_p);
        assert_eq!(a.origin(p, 0), p);
        assert_eq!(a.origin(p, CHANGE_PORT), p_port);
        assert_eq!(a.origin(p, CHANGE_IP), ip_p);
        assert_eq!(a.origin(p, CHANGE_IP | CHANGE_PORT), alt);
        assert_eq!(a.origin(alt, CHANGE_IP | CHANGE_PORT), p);
    }

    #[test]
    fn every_answer_names_its_origin_and_the_other_address() {
        let a = addrs();
        let client: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
        for local in a.all() {
            for flags in [0, CHANGE_PORT, CHANGE_IP, CHANGE_IP | CHANGE_PORT] {
                let reply =
                    answer(&a, &request(vec![change(flags)]), local, client).expect("reply");
                let m = decode(&reply.bytes);
                assert_eq!(m.typ, BINDING_SUCCESS);
                assert_eq!(reply.from, a.origin(local, flags));
                assert_eq!(reply.to, client);
                assert_eq!(address(&m, ATTR_RESPONSE_ORIGIN), reply.from);
                assert_eq!(address(&m, ATTR_OTHER_ADDRESS), a.other(local));
                let mut x = XorMappedAddress::default();
                x.get_from(&m).expect("xor-mapped");
                assert_eq!(SocketAddr::new(x.ip, x.port), client);
                FINGERPRINT.check(&m).expect("fingerprint");
            }
        }
    }

    #[test]
    fn response_port_redirects_to_the_clients_other_port() {
        let a = addrs();
        let client: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
        let port = Box::new(Raw(ATTR_RESPONSE_PORT, vec![0x9c, 0x41, 0, 0]));
        let reply = answer(&a, &request(vec![port]), a.primary, client).expect("reply");
        assert_eq!(reply.to, "198.51.100.7:40001".parse().expect("addr"));
    }

    #[test]
    fn malformed_and_unknown_attributes_get_errors_from_where_they_arrived() {
        let a = addrs();
        let client: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
        for bad in [
            Box::new(Raw(ATTR_CHANGE_REQUEST, vec![0, 4])) as Box<dyn Setter>,
            Box::new(Raw(ATTR_RESPONSE_PORT, vec![0, 0, 0, 0])),
        ] {
            let reply = answer(&a, &request(vec![bad]), a.primary, client).expect("reply");
            let m = decode(&reply.bytes);
            assert_eq!(m.typ, BINDING_ERROR);
            assert_eq!((reply.from, reply.to), (a.primary, client));
        }
        let unknown = Box::new(Raw(AttrType(0x7777), vec![1, 2, 3, 4]));
        let reply = answer(&a, &request(vec![unknown]), a.primary, client).expect("reply");
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        code.get_from(&decode(&reply.bytes)).expect("error code");
        assert!(code.code == stun::error_code::CODE_UNKNOWN_ATTRIBUTE);
    }

    proptest::proptest! {
        #[test]
        fn answering_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let a = addrs();
            let client: SocketAddr = "198.51.100.7:40000".parse().expect("addr");
            let _ = answer(&a, &body, a.primary, client);
            let mut framed = request(vec![]);
            framed.truncate(20);
            framed.extend_from_slice(&body);
            let _ = answer(&a, &framed, a.primary, client);
        }
    }
}
