//! A TCP forwarder that can cut the path it carries, for fault injection:
//! the chaos runner puts one between a signal node and Redis to cut that
//! node off while its clients stay connected, and tests do the same.
//!
//! While cut, open connections are closed and new ones are accepted and
//! closed at once, as a lost route looks to a client that reconnects.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running forwarder; it stops when dropped.
pub struct TcpFault {
    addr: SocketAddr,
    state: Arc<Mutex<Link>>,
    stop: CancellationToken,
}

/// Whether the path is up, and the token that ends the connections of
/// the current stretch of it being up.
struct Link {
    up: bool,
    connections: CancellationToken,
}

impl TcpFault {
    /// Listens on `listen` (port 0 for any) and forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Link {
            up: true,
            connections: CancellationToken::new(),
        }));
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, target, state.clone(), stop.clone()));
        Ok(Self { addr, state, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every forwarded connection and refuses new ones until
    /// [`TcpFault::restore`].
    pub fn cut(&self) {
        let mut link = self.link();
        link.up = false;
        link.connections.cancel();
    }

    /// Forwards again.
    pub fn restore(&self) {
        let mut link = self.link();
        link.up = true;
        link.connections = CancellationToken::new();
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for TcpFault {
    fn drop(&mut self) {
        self.stop.cancel();
        self.link().connections.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    state: Arc<Mutex<Link>>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((c, _)) => c,
                Err(_) => continue,
            },
        };
        let (up, cut) = {
            let link = state.lock().unwrap_or_else(|p| p.into_inner());
            (link.up, link.connections.clone())
        };
        if !up {
            drop(client);
            continue;
        }
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream) -> std::io::Result<[u8; 4]> {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("no answer"))??;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_cuts_and_restores() {
        let fault = TcpFault::start("127.0.0.1:0".parse().expect("addr"), echo().await)
            .await
            .expect("start");
        let mut before = TcpStream::connect(fault.addr()).await.expect("connect");
        assert_eq!(&roundtrip(&mut before).await.expect("forwarded"), b"ping");
        fault.cut();
        assert!(
            roundtrip(&mut before).await.is_err(),
            "cut closes open connections"
        );
        let mut during = TcpStream::connect(fault.addr()).await.expect("accepted");
        assert!(
            roundtrip(&mut during).await.is_err(),
            "and refuses new ones"
        );
        fault.restore();
        let mut after = TcpStream::connect(fault.addr()).await.expect("connect");
        assert_eq!(
            &roundtrip(&mut after).await.expect("forwarded again"),
            b"ping"
        );
    }
}
