//! STUN Binding (RFC 8489 §6 and §14): the part of the server that needs no
//! credentials. A plain function of (request bytes, source address) to
//! response bytes; the drivers own the sockets.

use std::net::SocketAddr;

use stun::attributes::{ATTR_FINGERPRINT, ATTR_SOFTWARE, AttrType, RawAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::message::{
    BINDING_ERROR, BINDING_SUCCESS, CLASS_REQUEST, METHOD_BINDING, Message, Setter,
};
use stun::xoraddr::XorMappedAddress;

/// `SOFTWARE` attribute value of every response.
pub const SOFTWARE: &str = concat!("floe ", env!("CARGO_PKG_VERSION"));

/// What to do with an incoming datagram that looked like STUN.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the response that was written into the message.
    Respond,
    /// Nothing to send (indication, or a message to discard silently).
    Discard,
}

/// Whether `buf` starts like a STUN message: top two bits zero and the
/// magic cookie in place (RFC 8489 §5).
pub fn looks_like_stun(buf: &[u8]) -> bool {
    buf.len() >= 20
        && buf[0] & 0xC0 == 0
        && buf[4..8] == stun::message::MAGIC_COOKIE.to_be_bytes()
        && usize::from(u16::from_be_bytes([buf[2], buf[3]])) + 20 == buf.len()
        && buf[3] & 0x03 == 0
}

/// Whether `buf` is a STUN Binding request (by its header).
pub fn is_binding_request(buf: &[u8]) -> bool {
    looks_like_stun(buf) && buf[0..2] == [0x00, 0x01]
}

/// CRC-32 of FINGERPRINT, with its table built at compile time.
const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// FINGERPRINT's XOR constant (RFC 8489 §14.7).
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// Room for the largest fast response: header, IPv6 XOR-MAPPED-ADDRESS,
/// SOFTWARE and FINGERPRINT.
pub const FAST_MAX: usize = 20 + 24 + 4 + 64 + 8;

/// Answers a plain Binding request straight from its bytes, writing the
/// success response (XOR-MAPPED-ADDRESS, SOFTWARE, FINGERPRINT) into
/// `out`. Returns `None` when the request needs the general path: not a
/// Binding request, a comprehension-required attribute to look at, or a
/// FINGERPRINT to reject (the general path discards it).
pub fn fast_response(req: &[u8], from: SocketAddr, out: &mut [u8; FAST_MAX]) -> Option<usize> {
    if !looks_like_stun(req) || req[0..2] != [0x00, 0x01] {
        return None;
    }
    let mut at = 20;
    while at < req.len() {
        let typ = u16::from_be_bytes([*req.get(at)?, *req.get(at + 1)?]);
        let len = usize::from(u16::from_be_bytes([*req.get(at + 2)?, *req.get(at + 3)?]));
        let next = at + 4 + len.div_ceil(4) * 4;
        if next > req.len() {
            return None;
        }
        if typ == ATTR_FINGERPRINT.0 {
            let value = req.get(at + 4..at + 8)?;
            let stated = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            if len != 4
                || next != req.len()
                || stated != CRC32.checksum(&req[..at]) ^ FINGERPRINT_XOR
            {
                return None;
            }
        } else if typ < 0x8000 {
            return None;
        }
        at = next;
    }
    let cookie = stun::message::MAGIC_COOKIE.to_be_bytes();
    out[0..2].copy_from_slice(&[0x01, 0x01]);
    out[4..8].copy_from_slice(&cookie);
    out[8..20].copy_from_slice(&req[8..20]);
    let mut n = 20;
    let port = from.port() ^ 0x2112;
    let (octets, ip_len) = match from.ip() {
        std::net::IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, 4)
        }
        std::net::IpAddr::V6(v6) => (v6.octets(), 16),
    };
    let ip = &octets[..ip_len];
    out[n..n + 2].copy_from_slice(&0x0020u16.to_be_bytes());
    out[n + 2..n + 4].copy_from_slice(&((4 + ip.len()) as u16).to_be_bytes());
    out[n + 4] = 0;
    out[n + 5] = if ip.len() == 4 { 0x01 } else { 0x02 };
    out[n + 6..n + 8].copy_from_slice(&port.to_be_bytes());
    for (i, b) in ip.iter().enumerate() {
        // XOR with the cookie, then the transaction id (RFC 8489 §14.2).
        let key = if i < 4 { cookie[i] } else { req[8 + i - 4] };
        out[n + 8 + i] = b ^ key;
    }
    n += 8 + ip.len();
    let software = SOFTWARE.as_bytes();
    out[n..n + 2].copy_from_slice(&ATTR_SOFTWARE.0.to_be_bytes());
    out[n + 2..n + 4].copy_from_slice(&(software.len() as u16).to_be_bytes());
    out[n + 4..n + 4 + software.len()].copy_from_slice(software);
    let padded = software.len().div_ceil(4) * 4;
    out[n + 4 + software.len()..n + 4 + padded].fill(0);
    n += 4 + padded;
    out[2..4].copy_from_slice(&((n + 8 - 20) as u16).to_be_bytes());
    let crc = CRC32.checksum(&out[..n]) ^ FINGERPRINT_XOR;
    out[n..n + 4].copy_from_slice(&[0x80, 0x28, 0x00, 0x04]);
    out[n + 4..n + 8].copy_from_slice(&crc.to_be_bytes());
    Some(n + 8)
}

/// Comprehension-required attributes (0x0000–0x7FFF) that a Binding request
/// may carry and that this server understands. CHANGE-REQUEST and
/// RESPONSE-PORT are NAT behaviour discovery's ([`crate::behavior`]); a
/// server without an alternate address answers them 420, as RFC 5780 §6.1
/// asks, except a CHANGE-REQUEST that asks for no change.
pub(crate) fn understood_in_binding(t: AttrType) -> bool {
    use stun::attributes::*;
    matches!(
        t,
        ATTR_MAPPED_ADDRESS
            | ATTR_USERNAME
            | ATTR_MESSAGE_INTEGRITY
            | ATTR_MESSAGE_INTEGRITY_SHA256
            | ATTR_XORMAPPED_ADDRESS
            | ATTR_PRIORITY
            | ATTR_USE_CANDIDATE
            | ATTR_PADDING
            | ATTR_REALM
            | ATTR_NONCE
            | ATTR_USER_HASH
    ) || t.0 >= 0x8000
}

/// Builds a Binding error answer `code` into `out`.
pub(crate) fn error(
    out: &mut Message,
    code: stun::error_code::ErrorCode,
    reason: &str,
    unknown: Vec<AttrType>,
) -> Result<(), stun::Error> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(BINDING_ERROR),
        Box::new(stun::error_code::ErrorCodeAttribute {
            code,
            reason: reason.as_bytes().to_vec(),
        }),
    ];
    if !unknown.is_empty() {
        setters.push(Box::new(stun::uattrs::UnknownAttributes(unknown)));
    }
    setters.push(Box::new(FINGERPRINT));
    out.build(&setters)
}

/// 420 Unknown Attribute with the list (RFC 8489 §6.3.1.1).
pub(crate) fn unknown_attribute(
    out: &mut Message,
    unknown: Vec<AttrType>,
) -> Result<(), stun::Error> {
    error(
        out,
        stun::error_code::CODE_UNKNOWN_ATTRIBUTE,
        "Unknown Attribute",
        unknown,
    )
}

/// Whether `req` is a Binding request to answer: a request (an
/// indication is a keepalive, RFC 8489 §6.3.2) whose FINGERPRINT, if it
/// has one, is right.
pub(crate) fn is_answerable(req: &Message) -> bool {
    req.typ.method == METHOD_BINDING
        && req.typ.class == CLASS_REQUEST
        && !(req.contains(ATTR_FINGERPRINT) && FINGERPRINT.check(req).is_err())
}

/// The comprehension-required attributes of `req` that `understood`
/// does not take (for 420 Unknown Attribute).
pub(crate) fn unknown_attributes(
    req: &Message,
    understood: impl Fn(&RawAttribute) -> bool,
) -> Vec<AttrType> {
    req.attributes
        .0
        .iter()
        .filter(|a| !understood(a))
        .map(|a| a.typ)
        .collect()
}

/// Builds a Binding success for a request from `from` into `out`:
/// XOR-MAPPED-ADDRESS, then `extra`, SOFTWARE and FINGERPRINT.
pub(crate) fn success(
    out: &mut Message,
    from: SocketAddr,
    extra: Vec<Box<dyn Setter>>,
) -> Result<(), stun::Error> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(BINDING_SUCCESS),
        Box::new(XorMappedAddress {
            ip: from.ip(),
            port: from.port(),
        }),
    ];
    setters.extend(extra);
    setters.push(Box::new(stun::textattrs::TextAttribute::new(
        ATTR_SOFTWARE,
        SOFTWARE.to_owned(),
    )));
    setters.push(Box::new(FINGERPRINT));
    out.build(&setters)
}

/// Handles a decoded Binding message from `from`, writing the answer into
/// `out`. `req` must be a decoded message whose method is Binding.
pub fn handle(req: &Message, from: SocketAddr, out: &mut Message) -> Outcome {
    if !is_answerable(req) {
        return Outcome::Discard;
    }
    out.reset();
    out.transaction_id = req.transaction_id;
    let unknown = unknown_attributes(req, |a| {
        let no_change = a.typ == stun::attributes::ATTR_CHANGE_REQUEST && a.value == [0; 4];
        understood_in_binding(a.typ) || no_change
    });
    let built = if unknown.is_empty() {
        success(out, from, Vec::new())
    } else {
        unknown_attribute(out, unknown)
    };
    match built {
        Ok(()) => Outcome::Respond,
        Err(e) => {
            tracing::debug!(error = %e, "cannot build Binding response");
            Outcome::Discard
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::{BINDING_REQUEST, CLASS_INDICATION, Getter};

    fn request(extra: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut m = Message::new();
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ];
        setters.extend(extra);
        m.build(&setters).expect("build request");
        m.raw
    }

    fn decode(raw: &[u8]) -> Message {
        let mut m = Message::new();
        m.raw = raw.to_vec();
        m.decode().expect("decode");
        m
    }

    #[test]
    fn binding_answers_with_xor_mapped_address_and_fingerprint() {
        let raw = request(vec![Box::new(FINGERPRINT)]);
        assert!(looks_like_stun(&raw));
        let req = decode(&raw);
        let from: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
        let mut out = Message::new();
        assert_eq!(handle(&req, from, &mut out), Outcome::Respond);
        let resp = decode(&out.raw);
        assert_eq!(resp.typ, BINDING_SUCCESS);
        assert_eq!(resp.transaction_id, req.transaction_id);
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&resp).expect("XOR-MAPPED-ADDRESS");
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);
        FINGERPRINT.check(&resp).expect("valid FINGERPRINT");

        let v6: SocketAddr = "[2001:db8::1]:5000".parse().expect("addr");
        assert_eq!(handle(&req, v6, &mut out), Outcome::Respond);
        let mut mapped = XorMappedAddress::default();
        mapped
            .get_from(&decode(&out.raw))
            .expect("XOR-MAPPED-ADDRESS");
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), v6);
    }

    #[test]
    fn fast_path_answers_like_the_general_path() {
        for from in ["203.0.113.7:40000", "[2001:db8::1]:5000"] {
            let from: SocketAddr = from.parse().expect("addr");
            for raw in [request(vec![]), request(vec![Box::new(FINGERPRINT)])] {
                let mut out = [0u8; FAST_MAX];
                let n =
                    fast_response(&raw, from, &mut out).expect("plain Binding takes the fast path");
                let resp = decode(&out[..n]);
                assert_eq!(resp.typ, BINDING_SUCCESS);
                assert_eq!(resp.transaction_id, decode(&raw).transaction_id);
                let mut mapped = XorMappedAddress::default();
                mapped.get_from(&resp).expect("XOR-MAPPED-ADDRESS");
                assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);
                FINGERPRINT.check(&resp).expect("valid FINGERPRINT");
                assert_eq!(
                    resp.get(ATTR_SOFTWARE).expect("SOFTWARE"),
                    SOFTWARE.as_bytes()
                );
            }
        }
        // Anything else goes the general way.
        let from: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let mut out = [0u8; FAST_MAX];
        let mut bad_fp = request(vec![Box::new(FINGERPRINT)]);
        let n = bad_fp.len();
        bad_fp[n - 1] ^= 1;
        assert_eq!(fast_response(&bad_fp, from, &mut out), None);
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        m.add(stun::attributes::ATTR_PRIORITY, &[0, 0, 0, 1]);
        m.write_length();
        assert_eq!(fast_response(&m.raw, from, &mut out), None);
        assert_eq!(
            fast_response(b"not stun at all, clearly", from, &mut out),
            None
        );
    }

    proptest::proptest! {
        #[test]
        fn fast_path_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let body = &body[..body.len() / 4 * 4];
            let mut raw = vec![0x00, 0x01];
            raw.extend_from_slice(&(body.len() as u16).to_be_bytes());
            raw.extend_from_slice(&stun::message::MAGIC_COOKIE.to_be_bytes());
            raw.extend_from_slice(&[9; 12]);
            raw.extend_from_slice(body);
            let mut out = [0u8; FAST_MAX];
            let _ = fast_response(&raw, "192.0.2.1:9".parse().expect("addr"), &mut out);
        }
    }

    /// The answer to a Binding request carrying attribute `typ` = `value`.
    fn answer_with(typ: AttrType, value: &[u8]) -> Message {
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        m.add(typ, value);
        m.write_length();
        let req = decode(&m.raw);
        let mut out = Message::new();
        assert_eq!(
            handle(&req, "192.0.2.1:1".parse().expect("addr"), &mut out),
            Outcome::Respond
        );
        decode(&out.raw)
    }

    #[test]
    fn unknown_comprehension_required_attribute_gets_420() {
        use stun::attributes::{ATTR_CHANGE_REQUEST, ATTR_RESPONSE_PORT};
        // Discovery attributes too, on a server without an alternate
        // address (RFC 5780 §6.1), unless a CHANGE-REQUEST asks for nothing.
        for (typ, value) in [
            (AttrType(0x7777), &b"what"[..]),
            (ATTR_CHANGE_REQUEST, &[0, 0, 0, 6][..]),
            (ATTR_RESPONSE_PORT, &[0x9c, 0x41, 0, 0][..]),
        ] {
            let resp = answer_with(typ, value);
            assert_eq!(resp.typ, BINDING_ERROR);
            let mut code = stun::error_code::ErrorCodeAttribute::default();
            code.get_from(&resp).expect("ERROR-CODE");
            assert!(code.code == stun::error_code::CODE_UNKNOWN_ATTRIBUTE);
            let mut unknown = stun::uattrs::UnknownAttributes(Vec::new());
            unknown.get_from(&resp).expect("UNKNOWN-ATTRIBUTES");
            assert_eq!(unknown.0, [typ]);
        }
        assert_eq!(
            answer_with(ATTR_CHANGE_REQUEST, &[0; 4]).typ,
            BINDING_SUCCESS
        );
    }

    #[test]
    fn indications_bad_fingerprints_and_non_stun_are_discarded() {
        let mut m = Message::new();
        m.build(&[
            Box::new(stun::message::MessageType::new(
                METHOD_BINDING,
                CLASS_INDICATION,
            )),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        let mut out = Message::new();
        let from = "192.0.2.1:1".parse().expect("addr");
        assert_eq!(handle(&decode(&m.raw), from, &mut out), Outcome::Discard);

        let mut raw = request(vec![Box::new(FINGERPRINT)]);
        let n = raw.len();
        raw[n - 1] ^= 0xFF;
        assert_eq!(handle(&decode(&raw), from, &mut out), Outcome::Discard);

        assert!(!looks_like_stun(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!looks_like_stun(&[0x40, 0, 0, 4, 1, 2, 3, 4]));
        let mut truncated = request(vec![]);
        truncated.pop();
        assert!(!looks_like_stun(&truncated));
    }
}
