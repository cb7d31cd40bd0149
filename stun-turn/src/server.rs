//! Listening sockets: UDP sockets (several on one port with SO_REUSEPORT,
//! so the kernel spreads clients over cores), each served by a shard
//! ([`crate::driver`]), and TCP and TLS acceptors with a reader and a
//! writer task per connection: the reader frames what the client sends
//! and hands it to the connection's shard, the writer sends the shard's
//! answers and relayed data. With NAT behaviour discovery configured,
//! the three alternate addresses get a UDP socket each that answers
//! Binding only, and every Binding answer leaves from the address
//! [`behavior::answer`] picks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use floe_common::Shutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::allocation::{Credit, Transport, Undelivered};
use crate::behavior::{self, Addresses, Reply};
use crate::core::Discard;
use crate::driver::Data;
use crate::framing::{self, Frame, MAX_FRAME};
use crate::turn::Turn;

/// How long a TCP connection may stay silent before it is closed.
const TCP_IDLE: Duration = Duration::from_secs(300);
/// Attempts at finding a port free for both UDP and TCP when asked for 0.
const PORT_ATTEMPTS: usize = 20;
/// Longest TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Frames queued towards one TCP client before it counts as too slow.
const TCP_QUEUE: usize = 1_024;
/// How long a stream client may take nothing before it counts as gone.
const TCP_WRITE_STALL: Duration = Duration::from_secs(30);
/// How long queued frames may still go out once a connection's reader
/// is done.
const TCP_FLUSH: Duration = Duration::from_secs(1);

/// Framed bytes on their way to a stream client, and the relayed payload
/// they carry, billed once written to the socket, so bytes a connection
/// never took are not billed.
pub(crate) struct Outbound {
    pub bytes: Bytes,
    pub credit: Option<Credit>,
}

pub(crate) fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Room for bursts: 4 MiB each way (the kernel caps it at rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds UDP and TCP on one port (a free one when `listen`'s port is 0).
pub(crate) fn bind_all(
    listen: SocketAddr,
    sockets: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, TcpListener)> {
    let sockets = match sockets {
        // One shard per core, as many as `--udp-sockets` allows.
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get().min(crate::config::MAX_UDP_SOCKETS)),
        n => n,
    };
    let mut last_err = None;
    for _ in 0..PORT_ATTEMPTS {
        let first = udp_socket(listen)?;
        let addr = first.local_addr()?;
        let tcp = match tcp_listener(addr) {
            Ok(l) => l,
            Err(e) if listen.port() == 0 => {
                last_err = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut udp = vec![first];
        for _ in 1..sockets {
            udp.push(udp_socket(addr)?);
        }
        return Ok((udp, tcp));
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// NAT behaviour discovery's addresses and a socket on each, to answer
/// from any of them.
pub(crate) struct Discovery {
    pub(crate) addrs: Addresses,
    /// Handles on the four sockets, for sending only (each socket is
    /// read by its own loop: a shard, or [`discovery_loop`]).
    senders: Vec<(SocketAddr, std::net::UdpSocket)>,
}

impl Discovery {
    /// Binds the alternate addresses of `primary` (a bound address):
    /// `alt_port` 0 picks a free one.
    pub(crate) fn bind(
        primary: SocketAddr,
        alt_ip: std::net::IpAddr,
        alt_port: u16,
    ) -> std::io::Result<(Addresses, Vec<std::net::UdpSocket>)> {
        let same_ip = udp_socket(SocketAddr::new(primary.ip(), alt_port))?;
        let alt_port = same_ip.local_addr()?.port();
        let addrs = Addresses {
            primary,
            alt_ip,
            alt_port,
        };
        let [_, _, ip_only, both] = addrs.all();
        Ok((
            addrs,
            vec![same_ip, udp_socket(ip_only)?, udp_socket(both)?],
        ))
    }

    /// Sends `reply` from its origin, without waiting; a lost answer is
    /// the client's to retransmit for.
    pub(crate) fn send(&self, reply: &Reply) {
        if let Some((_, socket)) = self.senders.iter().find(|(a, _)| *a == reply.from)
            && let Err(e) = socket.send_to(&reply.bytes, reply.to)
        {
            tracing::debug!(error = %e, to = %reply.to, "discovery answer not sent");
        }
    }
}

/// Spawns the socket tasks; `discovery` are the alternate addresses and
/// their sockets, when configured.
pub(crate) fn serve(
    turn: Arc<Turn>,
    udp: Vec<std::net::UdpSocket>,
    tcp: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    discovery: Option<(Addresses, Vec<std::net::UdpSocket>)>,
    shutdown: Shutdown,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let discovery = match discovery {
        None => None,
        Some((addrs, alternates)) => {
            let first = udp
                .first()
                .ok_or_else(|| std::io::Error::other("no UDP socket"))?;
            let mut senders = vec![(addrs.primary, first.try_clone()?)];
            let mut readers = Vec::new();
            for (addr, socket) in addrs.all()[1..].iter().copied().zip(alternates) {
                senders.push((addr, socket.try_clone()?));
                readers.push(UdpSocket::from_std(socket)?);
            }
            let d = Arc::new(Discovery { addrs, senders });
            for socket in readers {
                tasks.push(tokio::spawn(discovery_loop(
                    turn.clone(),
                    d.clone(),
                    socket,
                    shutdown.clone(),
                )));
            }
            Some(d)
        }
    };
    turn.spawn_shards(udp, discovery)?;
    let open = Arc::new(AtomicUsize::new(0));
    if let Some((listener, acceptor)) = tls {
        tasks.push(tokio::spawn(stream_accept(
            turn.clone(),
            listener,
            Some(acceptor),
            open.clone(),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(stream_accept(turn, tcp, None, open, shutdown)));
    Ok(tasks)
}

/// Answers Binding on one of discovery's alternate addresses; anything
/// else there is dropped.
async fn discovery_loop(
    turn: Arc<Turn>,
    discovery: Arc<Discovery>,
    socket: UdpSocket,
    shutdown: Shutdown,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME];
    let answered = turn
        .metrics
        .stun_requests
        .with_label_values(&["binding", "udp", "success"]);
    loop {
        let (len, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        match behavior::answer(&discovery.addrs, &buf[..len], local, from) {
            Some(reply) => {
                answered.inc();
                discovery.send(&reply);
            }
            None => turn
                .metrics
                .discarded
                .with_label_values(&["not_binding"])
                .inc(),
        }
    }
}

/// Accepts TCP (or, with an acceptor, TLS) clients; connections count
/// together against `--max-tcp-connections`.
async fn stream_accept(
    turn: Arc<Turn>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    open: Arc<AtomicUsize>,
    shutdown: Shutdown,
) {
    let max = turn.settings.max_tcp_connections;
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    loop {
        let (stream, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            turn.metrics
                .discarded
                .with_label_values(&["tcp_connection_limit"])
                .inc();
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (turn, shutdown, open, tls) =
            (turn.clone(), shutdown.clone(), open.clone(), tls.clone());
        tokio::spawn(async move {
            turn.metrics.tcp_connections.inc();
            let result = match tls {
                None => stream_connection(&turn, stream, from, transport, &shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => stream_connection(&turn, s, from, transport, &shutdown).await,
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %from, "stream connection closed");
            }
            turn.metrics.tcp_connections.dec();
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Serves one stream connection: a reader that frames what the client
/// sends and hands it to the connection's shard, and a writer draining
/// the connection's queue (the shard's answers and relayed data). The
/// connection ends when either side fails, so an allocation never
/// outlives the socket that delivers to it: the shard closes it when
/// told the connection is gone (RFC 8656 §3.1).
async fn stream_connection<S>(
    turn: &Arc<Turn>,
    stream: S,
    from: SocketAddr,
    transport: Transport,
    shutdown: &Shutdown,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let shard = turn
        .shard_for(from)
        .ok_or_else(|| std::io::Error::other("no TURN shard"))?;
    let (mut reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Outbound>(TCP_QUEUE);
    let (reading_done, writer_failed) = (CancellationToken::new(), CancellationToken::new());
    let write_task = tokio::spawn(write_stream(
        turn.clone(),
        writer,
        rx,
        reading_done.clone(),
        writer_failed.clone(),
    ));
    let gone = || {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "writing to the client failed",
        )
    };
    let connected = Data::Connected {
        from,
        transport,
        writer: tx,
    };
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut filled = 0;
    let result = if !shard.data(connected).await {
        Err(std::io::Error::other("TURN shard stopped"))
    } else {
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = writer_failed.cancelled() => break Err(gone()),
                r = tokio::time::timeout(TCP_IDLE, reader.read(&mut buf[filled..])) => match r {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => break Err(e),
                    Err(_) => break Ok(()),
                },
            };
            if n == 0 {
                break Ok(());
            }
            filled += n;
            // Whole frames go to the shard; a partial one waits for more.
            let mut whole = 0;
            let failure = loop {
                match framing::next_frame(&buf[whole..filled], true) {
                    Ok(Some(Frame::Stun { len } | Frame::ChannelData { len, .. })) => whole += len,
                    Ok(None) => break None,
                    Err(e) => {
                        turn.metrics
                            .discarded
                            .with_label_values(&["bad_framing"])
                            .inc();
                        break Some(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
                    }
                }
            };
            if whole > 0 {
                let frames = Data::Frames {
                    from,
                    transport,
                    bytes: buf[..whole].to_vec(),
                };
                // A client whose writer failed meanwhile is not served
                // further (its answers could not reach it).
                if writer_failed.is_cancelled() {
                    break Err(gone());
                }
                if !shard.data(frames).await {
                    break Err(std::io::Error::other("TURN shard stopped"));
                }
            }
            if let Some(e) = failure {
                break Err(e);
            }
            buf.copy_within(whole..filled, 0);
            filled -= whole;
        }
    };
    // The shard drops its end of the queue and closes the allocation.
    shard.data(Data::Disconnected { from, transport }).await;
    reading_done.cancel();
    let _ = write_task.await;
    result
}

/// Writes a stream connection's queue to its socket, billing relayed
/// payload as it goes out. A client that takes nothing for
/// [`TCP_WRITE_STALL`], or a failed write, ends the connection
/// (`failed`). Once the reader is done, what is queued gets
/// [`TCP_FLUSH`] to go out; whatever is left is counted as undelivered.
async fn write_stream<W: AsyncWrite>(
    turn: Arc<Turn>,
    writer: W,
    mut rx: mpsc::Receiver<Outbound>,
    reading_done: CancellationToken,
    failed: CancellationToken,
) {
    let gone = Discard::new(&turn.metrics, Undelivered::Gone.reason());
    let mut writer = std::pin::pin!(writer);
    let flush_deadline = async {
        reading_done.cancelled().await;
        tokio::time::sleep(TCP_FLUSH).await;
    };
    let mut flush_deadline = std::pin::pin!(flush_deadline);
    let mut ok = true;
    while ok {
        let item = tokio::select! {
            biased;
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            // The reader is done and the queue is empty.
            _ = reading_done.cancelled(), if rx.is_empty() => break,
        };
        ok = tokio::select! {
            r = tokio::time::timeout(TCP_WRITE_STALL, writer.write_all(&item.bytes)) => matches!(r, Ok(Ok(()))),
            _ = &mut flush_deadline => false,
        };
        match (&item.credit, ok) {
            (Some(c), true) => c.bill(),
            (Some(c), false) => gone.count(c.bytes),
            (None, _) => {}
        }
    }
    rx.close();
    while let Ok(item) = rx.try_recv() {
        if let Some(c) = item.credit {
            gone.count(c.bytes);
        }
    }
    if !ok {
        failed.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::allocation::Counters;

    /// A writer that takes `accept` writes, then fails every one.
    struct FailingWriter {
        accept: usize,
    }

    impl AsyncWrite for FailingWriter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.accept == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            self.accept -= 1;
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn binding_successes(turn: &Turn) -> u64 {
        turn.metrics
            .stun_requests
            .with_label_values(&["binding", "tcp", "success"])
            .get()
    }

    /// When writing to a client fails, the connection ends at once (it
    /// used to read on for the idle timeout, its allocation billing bytes
    /// no one delivered), and no request is handled twice.
    #[tokio::test]
    async fn a_failed_writer_ends_the_connection() {
        let (turn, _) = crate::turn::tests::server();
        let (mut client, server_side) = tokio::io::duplex(4096);
        let stream = tokio::io::join(server_side, FailingWriter { accept: 0 });
        let conn = tokio::spawn({
            let turn = turn.clone();
            async move {
                let from = "127.0.0.1:4000".parse().expect("addr");
                stream_connection(&turn, stream, from, Transport::Tcp, &Shutdown::new()).await
            }
        });
        client
            .write_all(&crate::turn::tests::binding_request())
            .await
            .expect("write");
        let ended = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection ends without waiting for the idle timeout")
            .expect("join");
        assert_eq!(
            ended.expect_err("broken pipe").kind(),
            std::io::ErrorKind::BrokenPipe
        );
        // The client's next request finds no one.
        let _ = client
            .write_all(&crate::turn::tests::binding_request())
            .await;
        assert_eq!(binding_successes(&turn), 1);
    }

    /// Relayed bytes are billed "in" when written; what a failed
    /// connection never took is counted undelivered instead.
    #[tokio::test]
    async fn relayed_bytes_are_billed_when_written() {
        let (turn, _) = crate::turn::tests::server();
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(16);
        for _ in 0..5 {
            let bytes = Bytes::from_static(&[0u8; 104]);
            tx.try_send(Outbound {
                bytes,
                credit: Some(Credit {
                    counters: counters.clone(),
                    bytes: 100,
                    inbound: true,
                }),
            })
            .expect("queue");
        }
        let (done, failed) = (CancellationToken::new(), CancellationToken::new());
        let writer = tokio::spawn(write_stream(
            turn.clone(),
            FailingWriter { accept: 3 },
            rx,
            done.clone(),
            failed.clone(),
        ));
        tokio::time::timeout(Duration::from_secs(10), failed.cancelled())
            .await
            .expect("the failure is signalled");
        // Queued after the failure: refused, as the sink's try_send sees.
        assert!(
            tx.try_send(Outbound {
                bytes: Bytes::new(),
                credit: None
            })
            .is_err()
        );
        writer.await.expect("writer");
        assert_eq!(
            counters.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            300
        );
        let gone = turn
            .metrics
            .discarded_bytes
            .with_label_values(&["client_gone"])
            .get();
        assert_eq!(gone, 200);
    }
}
