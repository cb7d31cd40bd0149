//! `Link` against the real Redis servers `scripts/test.sh` starts: TLS with
//! a throwaway CA, and a Sentinel set whose master is stopped.

use std::time::{Duration, Instant};

use floe_common::redis_link::testing::{SentinelSet, endpoint};
use floe_common::redis_link::{Endpoint, Link};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::ConnectionManagerConfig;

fn config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1)
}

#[tokio::test]
async fn tls_trusts_the_given_ca_and_only_it() {
    let with_ca = endpoint("FLOE_TEST_REDIS_TLS_URL");
    let mut link = Link::connect(&with_ca, config())
        .await
        .expect("TLS with the CA");
    let _: () = link
        .set("floe-test:tls", "yes")
        .await
        .expect("SET over TLS");
    let got: String = link.get("floe-test:tls").await.expect("GET over TLS");
    assert_eq!(got, "yes");

    // The same server with the system's roots: the throwaway CA is not
    // among them, so the handshake fails (and does not hang).
    let url = std::env::var("FLOE_TEST_REDIS_TLS_URL").expect("set");
    let system_roots = Endpoint::parse("test", &url, None, None).expect("valid");
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        Link::connect(&system_roots, config()),
    )
    .await
    .expect("an untrusted certificate fails fast");
    let Err(e) = refused else {
        panic!("a server certificate from an unknown CA was accepted")
    };
    assert!(
        e.to_string().to_lowercase().contains("certificate"),
        "the error names the certificate: {e}"
    );

    // And plain text to the TLS port is not taken for a working link.
    let plain = Endpoint::parse(
        "test",
        &url.replacen("rediss://", "redis://", 1),
        None,
        None,
    )
    .expect("valid");
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let mut link = Link::connect(&plain, config()).await?;
        redis::cmd("PING").query_async::<String>(&mut link).await
    })
    .await
    .expect("plain text to a TLS port fails fast");
    assert!(plain.is_err(), "plain text to a TLS port answered PING");
}

#[tokio::test]
async fn a_sentinel_failover_moves_the_link_to_the_new_master() {
    let set = SentinelSet::from_env();
    let mut link = Link::connect(&endpoint("FLOE_TEST_REDIS_SENTINEL_URL"), config())
        .await
        .expect("through Sentinel");
    let old = link.server();
    assert_eq!(old, set.master().await, "the link uses the master");
    let key = format!(
        "floe-test:failover:{}",
        floe_common::secret::random_token(4)
    );
    let _: () = link.set(&key, "before").await.expect("SET");
    // Acknowledged by the replica before the master goes.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2_000)
        .query_async(&mut link)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica has the write");

    assert_eq!(set.stop_master().await, old);
    let stopped = Instant::now();

    // Commands fail until the sentinel promotes the replica and the link
    // follows; then they work against the new master, with the data.
    let mut failed = 0u32;
    loop {
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "no new master within 30 s ({failed} failed commands)"
        );
        match link.get::<_, String>(&key).await {
            Ok(value) if link.server() != old => {
                assert_eq!(value, "before", "the replica's copy");
                break;
            }
            Ok(_) => {}
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = link
        .set(&key, "after")
        .await
        .expect("SET on the new master");
    println!(
        "failover: back after {:?}, {failed} commands failed meanwhile",
        stopped.elapsed()
    );
    let new = link.server();
    assert_ne!(new, old, "the link moved");
    assert_eq!(new, set.master().await);
    assert!(link.switches() >= 1);

    // A subscription made now is on the new master.
    let channel = format!("{key}:channel");
    let mut pubsub = link.pubsub().await.expect("pubsub on the new master");
    pubsub.subscribe(&channel).await.expect("subscribe");
    let receivers: i64 = link.publish(&channel, "hello").await.expect("PUBLISH");
    assert_eq!(receivers, 1);
    let mut messages = pubsub.into_on_message();
    let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("the message arrives")
        .expect("a message");
    assert_eq!(message.get_payload::<String>().expect("text"), "hello");

    set.restore(&old).await;
}
