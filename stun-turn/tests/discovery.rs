//! NAT behaviour discovery (RFC 5780) end to end on loopback: a server
//! with `--alt-ip 127.0.0.2` answers on its four addresses from where the
//! client asked, and `floe stun-probe`'s logic classifies the (absent) NAT.

use std::net::SocketAddr;
use std::time::Duration;

use floe_common::Shutdown;
use floe_turn::probe::{self, Filtering, Mapping, ProbeConfig};
use floe_turn::{Settings, TurnServer};
use tokio::net::UdpSocket;

async fn server() -> TurnServer {
    let mut s = Settings::new(
        "127.0.0.1:0".parse().expect("addr"),
        "127.0.0.1:0".parse().expect("addr"),
    );
    s.alt = Some(("127.0.0.2".parse().expect("ip"), 0));
    floe_turn::start(s, Shutdown::new()).await.expect("starts")
}

#[tokio::test]
async fn every_change_request_is_answered_from_the_address_it_names() {
    let turn = server().await;
    let addrs = turn.discovery_addrs().expect("discovery is on");
    assert_eq!(addrs.primary, turn.listen_addr());
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let me = client.local_addr().expect("addr");
    let mut buf = [0u8; 1500];
    for to in addrs.all() {
        for flags in [
            0,
            probe_flags::PORT,
            probe_flags::IP,
            probe_flags::IP | probe_flags::PORT,
        ] {
            let (req, id) = probe::request(flags);
            client.send_to(&req, to).await.expect("send");
            let (n, source) =
                tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
                    .await
                    .expect("an answer within 2 s")
                    .expect("recv");
            let answer = probe::parse(&buf[..n], source, &id).expect("a Binding success");
            assert_eq!(answer.mapped, me);
            assert_eq!(
                answer.origin,
                Some(source),
                "RESPONSE-ORIGIN is the real source"
            );
            let expected = expected_origin(&addrs, to, flags);
            assert_eq!(source, expected, "asked {to} with flags {flags:#x}");
            let other = answer.other.expect("OTHER-ADDRESS");
            assert!(
                other.ip() != to.ip() && other.port() != to.port(),
                "{other} vs {to}"
            );
        }
    }
    // Anything but Binding on an alternate address is dropped.
    client
        .send_to(b"not stun at all", addrs.all()[3])
        .await
        .expect("send");
    let nothing =
        tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await;
    assert!(nothing.is_err());
    turn.stop().await;
}

mod probe_flags {
    pub const IP: u32 = floe_turn::behavior::CHANGE_IP;
    pub const PORT: u32 = floe_turn::behavior::CHANGE_PORT;
}

fn expected_origin(a: &floe_turn::behavior::Addresses, to: SocketAddr, flags: u32) -> SocketAddr {
    let ip = if flags & probe_flags::IP == 0 {
        to.ip()
    } else if to.ip() == a.alt_ip {
        a.primary.ip()
    } else {
        a.alt_ip
    };
    let port = if flags & probe_flags::PORT == 0 {
        to.port()
    } else if to.port() == a.alt_port {
        a.primary.port()
    } else {
        a.alt_port
    };
    SocketAddr::new(ip, port)
}

#[tokio::test]
async fn the_probe_sees_no_nat_on_loopback() {
    let turn = server().await;
    let found = probe::probe(&ProbeConfig {
        server: turn.listen_addr().to_string(),
        wait_ms: 300,
        json: false,
    })
    .await
    .expect("probe");
    assert_eq!(found.mapping, Mapping::NoNat);
    assert_eq!(found.filtering, Filtering::EndpointIndependent);
    assert_eq!(
        found.other_address,
        turn.discovery_addrs().expect("on").all()[3]
    );
    assert_eq!(found.kind(), "no NAT");
    turn.stop().await;
}

#[tokio::test]
async fn a_server_without_discovery_is_named_as_such() {
    let turn = floe_turn::start(
        Settings::new(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        ),
        Shutdown::new(),
    )
    .await
    .expect("starts");
    let err = probe::probe(&ProbeConfig {
        server: turn.listen_addr().to_string(),
        wait_ms: 300,
        json: false,
    })
    .await
    .expect_err("no OTHER-ADDRESS");
    assert!(
        err.to_string()
            .contains("does not support NAT behaviour discovery"),
        "{err}"
    );
    turn.stop().await;
}

/// coturn's RFC 5780 client (`turnutils_natdiscovery`, package coturn,
/// installed by scripts/test.sh) reads floe's answers: with no NAT in the
/// way it reports independent mapping and filtering.
#[tokio::test]
async fn coturns_natdiscovery_reads_the_answers() {
    let turn = server().await;
    let port = turn.listen_addr().port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("turnutils_natdiscovery")
            .args(["-m", "-f", "-p", &port, "127.0.0.1"])
            .output()
    })
    .await
    .expect("joins")
    .expect("turnutils_natdiscovery runs (scripts/test.sh installs coturn)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NAT with Endpoint Independent Mapping!"),
        "{text}"
    );
    assert!(
        text.contains("NAT with Endpoint Independent Filtering!"),
        "{text}"
    );
    let other = turn.discovery_addrs().expect("on").all()[3];
    assert!(text.contains(&format!("Other addr: : {other}")), "{text}");
    turn.stop().await;
}
