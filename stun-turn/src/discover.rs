//! Learning the public address of a server behind 1:1 NAT (a cloud node's
//! private address mapped to its public one): a STUN Binding request from
//! the relay address to a STUN server outside; the XOR-MAPPED-ADDRESS it
//! answers is what peers must be told instead of the private address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use stun::message::{BINDING_REQUEST, Getter, Message};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;

/// Attempts, each waiting `WAIT` for an answer.
const ATTEMPTS: u32 = 5;
const WAIT: Duration = Duration::from_secs(2);

/// Why the external address could not be learned.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot resolve STUN server {0}")]
    Resolve(String),
    #[error("no answer from STUN server {server} after {ATTEMPTS} tries")]
    NoAnswer { server: String },
    #[error("STUN server {server} answered without XOR-MAPPED-ADDRESS")]
    BadAnswer { server: String },
    #[error("discovering the external address: {0}")]
    Io(#[from] std::io::Error),
}

/// The address `server` (`host:port`) sees requests from `local` as.
pub async fn external_ip(local: IpAddr, server: &str) -> Result<IpAddr, DiscoverError> {
    let target = tokio::net::lookup_host(server)
        .await
        .map_err(|_| DiscoverError::Resolve(server.to_owned()))?
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| DiscoverError::Resolve(server.to_owned()))?;
    let sock = UdpSocket::bind(SocketAddr::new(local, 0)).await?;
    let mut buf = [0u8; 1_500];
    for _ in 0..ATTEMPTS {
        let mut req = Message::new();
        req.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        sock.send_to(&req.raw, target).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            let (n, from) = r?;
            if from != target {
                continue;
            }
            match mapped(&buf[..n], &req) {
                Some(Ok(ip)) => return Ok(ip),
                Some(Err(())) => {
                    return Err(DiscoverError::BadAnswer {
                        server: server.to_owned(),
                    });
                }
                None => {}
            }
        }
    }
    Err(DiscoverError::NoAnswer {
        server: server.to_owned(),
    })
}

/// The mapped address in `raw` if it answers `req`: `None` when it is not
/// an answer to it, `Some(Err)` when it is one without the address.
fn mapped(raw: &[u8], req: &Message) -> Option<Result<IpAddr, ()>> {
    let mut m = Message::new();
    m.raw = raw.to_vec();
    m.decode().ok()?;
    if m.transaction_id != req.transaction_id {
        return None;
    }
    let mut addr = XorMappedAddress::default();
    Some(addr.get_from(&m).map(|()| addr.ip).map_err(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::{BINDING_SUCCESS, Setter};

    fn answer(to: &Message, setters: Vec<Box<dyn Setter>>) -> Vec<u8> {
        let mut m = Message::new();
        let mut all: Vec<Box<dyn Setter>> =
            vec![Box::new(BINDING_SUCCESS), Box::new(to.transaction_id)];
        all.extend(setters);
        m.build(&all).expect("build");
        m.raw
    }

    #[test]
    fn the_mapped_address_of_the_matching_answer() {
        let mut req = Message::new();
        req.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        let public: IpAddr = "203.0.113.7".parse().expect("ip");
        let good = answer(
            &req,
            vec![Box::new(XorMappedAddress {
                ip: public,
                port: 40_000,
            })],
        );
        assert_eq!(mapped(&good, &req), Some(Ok(public)));
        assert_eq!(mapped(&answer(&req, vec![]), &req), Some(Err(())));
        let mut other = Message::new();
        other
            .build(&[
                Box::new(BINDING_REQUEST),
                Box::new(stun::agent::TransactionId::new()),
            ])
            .expect("build");
        assert_eq!(mapped(&good, &other), None, "another transaction");
        assert_eq!(mapped(b"not stun", &req), None);
    }
}
