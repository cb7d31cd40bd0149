//! STUN Binding (RFC 8489 §6 and §14): the part of the server that needs no
//! credentials. A plain function of (request bytes, source address) to
//! response bytes; the drivers own the sockets.

use std::net::SocketAddr;

use stun::attributes::{ATTR_FINGERPRINT, ATTR_SOFTWARE, AttrType};
use stun::fingerprint::FINGERPRINT;
use stun::message::{
    BINDING_ERROR, BINDING_SUCCESS, CLASS_INDICATION, CLASS_REQUEST, METHOD_BINDING, Message,
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

/// Comprehension-required attributes (0x0000–0x7FFF) that a Binding request
/// may carry and that this server understands.
fn understood_in_binding(t: AttrType) -> bool {
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
            | ATTR_RESPONSE_PORT
            | ATTR_REALM
            | ATTR_NONCE
            | ATTR_USER_HASH
            | ATTR_CHANGE_REQUEST
    ) || t.0 >= 0x8000
}

/// Handles a decoded Binding message from `from`, writing the answer into
/// `out`. `req` must be a decoded message whose method is Binding.
pub fn handle(req: &Message, from: SocketAddr, out: &mut Message) -> Outcome {
    if req.typ.method != METHOD_BINDING {
        return Outcome::Discard;
    }
    if req.typ.class == CLASS_INDICATION {
        // A Binding indication is a keepalive: no answer (RFC 8489 §6.3.2).
        return Outcome::Discard;
    }
    if req.typ.class != CLASS_REQUEST {
        return Outcome::Discard;
    }
    if req.contains(ATTR_FINGERPRINT) && FINGERPRINT.check(req).is_err() {
        return Outcome::Discard;
    }
    out.reset();
    out.transaction_id = req.transaction_id;
    let unknown: Vec<AttrType> = req
        .attributes
        .0
        .iter()
        .map(|a| a.typ)
        .filter(|t| !understood_in_binding(*t))
        .collect();
    let built = if unknown.is_empty() {
        out.build(&[
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(stun::textattrs::TextAttribute::new(
                ATTR_SOFTWARE,
                SOFTWARE.to_owned(),
            )),
            Box::new(FINGERPRINT),
        ])
    } else {
        // 420 Unknown Attribute with the list (RFC 8489 §6.3.1.1).
        out.build(&[
            Box::new(BINDING_ERROR),
            Box::new(stun::error_code::ErrorCodeAttribute {
                code: stun::error_code::CODE_UNKNOWN_ATTRIBUTE,
                reason: b"Unknown Attribute".to_vec(),
            }),
            Box::new(stun::uattrs::UnknownAttributes(unknown)),
            Box::new(FINGERPRINT),
        ])
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
    use stun::message::{BINDING_REQUEST, Getter, Setter};

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
    fn unknown_comprehension_required_attribute_gets_420() {
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        m.add(AttrType(0x7777), b"what");
        m.write_length();
        let req = decode(&m.raw);
        let mut out = Message::new();
        assert_eq!(
            handle(&req, "192.0.2.1:1".parse().expect("addr"), &mut out),
            Outcome::Respond
        );
        let resp = decode(&out.raw);
        assert_eq!(resp.typ, BINDING_ERROR);
        let mut code = stun::error_code::ErrorCodeAttribute::default();
        code.get_from(&resp).expect("ERROR-CODE");
        assert!(code.code == stun::error_code::CODE_UNKNOWN_ATTRIBUTE);
        let mut unknown = stun::uattrs::UnknownAttributes(Vec::new());
        unknown.get_from(&resp).expect("UNKNOWN-ATTRIBUTES");
        assert_eq!(unknown.0, [AttrType(0x7777)]);
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
