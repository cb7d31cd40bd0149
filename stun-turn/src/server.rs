//! Socket drivers: UDP sockets (several on one port with SO_REUSEPORT, so
//! the kernel spreads clients over cores) and TCP and TLS acceptors with a
//! reader and a writer task per connection. They read bytes, frame them, and hand
//! them to [`Turn`]. With NAT behaviour discovery configured, the three
//! alternate addresses get a UDP socket each that answers Binding only,
//! and every Binding answer leaves from the address [`behavior::answer`]
//! picks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use floe_common::Shutdown;
use floe_common::udp_batch::{RecvBatch, SendBatch};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::allocation::{ClientSink, Outbound, Transport, Undelivered};
use crate::behavior::{self, Addresses, Reply};
use crate::binding;
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

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Room for bursts: 4 MiB each way (the kernel caps it at rmem_max).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
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
) -> std::io::Result<(Vec<UdpSocket>, TcpListener)> {
    let sockets = match sockets {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
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
    sockets: Vec<(SocketAddr, Arc<UdpSocket>)>,
}

impl Discovery {
    /// Binds the alternate addresses of `primary` (a bound address):
    /// `alt_port` 0 picks a free one.
    pub(crate) fn bind(
        primary: SocketAddr,
        alt_ip: std::net::IpAddr,
        alt_port: u16,
    ) -> std::io::Result<(Addresses, Vec<UdpSocket>)> {
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

    /// Sends `reply` from its origin; a lost answer is the client's to
    /// retransmit for.
    async fn send(&self, reply: &Reply) {
        if let Some((_, socket)) = self.sockets.iter().find(|(a, _)| *a == reply.from)
            && let Err(e) = socket.send_to(&reply.bytes, reply.to).await
        {
            tracing::debug!(error = %e, to = %reply.to, "discovery answer not sent");
        }
    }
}

/// Spawns the socket tasks; `discovery` are the alternate addresses and
/// their sockets, when configured.
pub(crate) fn serve(
    turn: Arc<Turn>,
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    discovery: Option<(Addresses, Vec<UdpSocket>)>,
    shutdown: Shutdown,
) -> Vec<JoinHandle<()>> {
    let udp: Vec<Arc<UdpSocket>> = udp.into_iter().map(Arc::new).collect();
    let discovery = discovery.map(|(addrs, alternates)| {
        let mut sockets = vec![(addrs.primary, udp[0].clone())];
        sockets.extend(
            addrs.all()[1..]
                .iter()
                .copied()
                .zip(alternates.into_iter().map(Arc::new)),
        );
        Arc::new(Discovery { addrs, sockets })
    });
    let mut tasks: Vec<JoinHandle<()>> = udp
        .into_iter()
        .map(|s| {
            tokio::spawn(udp_loop(
                turn.clone(),
                s,
                discovery.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    if let Some(d) = &discovery {
        for (_, socket) in &d.sockets[1..] {
            tasks.push(tokio::spawn(discovery_loop(
                turn.clone(),
                d.clone(),
                socket.clone(),
                shutdown.clone(),
            )));
        }
    }
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
    tasks
}

/// Answers Binding on one of discovery's alternate addresses; anything
/// else there is dropped.
async fn discovery_loop(
    turn: Arc<Turn>,
    discovery: Arc<Discovery>,
    socket: Arc<UdpSocket>,
    shutdown: Shutdown,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME];
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
                turn.count_binding_answer(Transport::Udp);
                discovery.send(&reply).await;
            }
            None => turn
                .metrics
                .discarded
                .with_label_values(&["not_binding"])
                .inc(),
        }
    }
}

async fn udp_loop(
    turn: Arc<Turn>,
    socket: Arc<UdpSocket>,
    discovery: Option<Arc<Discovery>>,
    shutdown: Shutdown,
) {
    let Ok(local) = socket.local_addr() else {
        return;
    };
    let mut batch = RecvBatch::new(local, MAX_FRAME);
    let mut answers = SendBatch::default();
    loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = batch.recv(&socket) => match r {
                Ok(n) => n,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    tracing::debug!(error = %e, "UDP receive error");
                    continue;
                }
            },
        };
        for i in 0..n {
            let (buf, len, from) = batch.get_mut(i);
            let Some(from) = from else { continue };
            let datagram = &buf[..len];
            match framing::next_frame(datagram, false) {
                Ok(Some(Frame::ChannelData { channel, data, .. })) => {
                    turn.on_channel_data(from, Transport::Udp, channel, &datagram[4..4 + data]);
                }
                Ok(Some(Frame::Stun { len: stun }))
                    if stun == len
                        && let Some(d) = &discovery
                        && binding::is_binding_request(datagram) =>
                {
                    let Some(reply) = behavior::answer(&d.addrs, datagram, local, from) else {
                        continue;
                    };
                    turn.count_binding_answer(Transport::Udp);
                    if reply.from == local {
                        answers.push(&reply.bytes, reply.to);
                    } else {
                        d.send(&reply).await;
                    }
                }
                Ok(Some(Frame::Stun { len: stun })) if stun == len => {
                    let sink = ClientSink::Udp {
                        socket: socket.clone(),
                        addr: from,
                    };
                    if let Some(resp) = turn.on_stun(datagram, from, Transport::Udp, &sink).await {
                        answers.push(&resp, from);
                    }
                }
                _ => {
                    turn.metrics
                        .discarded
                        .with_label_values(&["bad_datagram"])
                        .inc();
                }
            }
        }
        let refused = answers.flush(&socket).await;
        if refused > 0 {
            tracing::debug!(refused, "UDP answers the kernel refused");
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
            // A stream allocation lives as long as its connection (RFC 8656 §3.1).
            if let Some(a) = turn
                .allocations()
                .into_iter()
                .find(|a| a.client == from && a.transport == transport)
            {
                turn.metrics
                    .allocations_closed
                    .with_label_values(&["connection"])
                    .inc();
                turn.close(&a, "connection closed");
            }
            turn.metrics.tcp_connections.dec();
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Serves one stream connection: a reader that frames and handles what
/// the client sends, and a writer draining the connection's queue. The
/// connection ends when either side fails, so an allocation never
/// outlives the socket that delivers to it.
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
    let sink = ClientSink::Stream(tx.clone());
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut filled = 0;
    let gone = || {
        std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "writing to the client failed",
        )
    };
    let result = loop {
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
        let mut start = 0;
        let failure = loop {
            match framing::next_frame(&buf[start..filled], true) {
                Ok(Some(Frame::Stun { len })) => {
                    let frame = start..start + len;
                    start += len;
                    if let Some(resp) = turn.on_stun(&buf[frame], from, transport, &sink).await {
                        let out = Outbound {
                            bytes: Bytes::from(resp),
                            credit: None,
                        };
                        if tx.send(out).await.is_err() {
                            break Some(gone());
                        }
                    }
                }
                Ok(Some(Frame::ChannelData { channel, data, len })) => {
                    turn.on_channel_data(
                        from,
                        transport,
                        channel,
                        &buf[start + 4..start + 4 + data],
                    );
                    start += len;
                }
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
        if let Some(e) = failure {
            break Err(e);
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    };
    reading_done.cancel();
    drop(sink);
    drop(tx);
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
            (Some((counters, n)), true) => counters.record_in(*n),
            (Some((_, n)), false) => turn.undelivered(Undelivered::Gone.reason(), *n),
            (None, _) => {}
        }
    }
    rx.close();
    while let Ok(item) = rx.try_recv() {
        if let Some((_, n)) = item.credit {
            turn.undelivered(Undelivered::Gone.reason(), n);
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

    fn binding_request() -> Vec<u8> {
        let mut m = stun::message::Message::new();
        m.build(&[
            Box::new(stun::message::BINDING_REQUEST),
            Box::new(stun::agent::TransactionId::new()),
        ])
        .expect("build");
        m.raw
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
        let turn = crate::turn::tests::server();
        let (mut client, server_side) = tokio::io::duplex(4096);
        let stream = tokio::io::join(server_side, FailingWriter { accept: 0 });
        let conn = tokio::spawn({
            let turn = turn.clone();
            async move {
                let from = "127.0.0.1:4000".parse().expect("addr");
                stream_connection(&turn, stream, from, Transport::Tcp, &Shutdown::new()).await
            }
        });
        client.write_all(&binding_request()).await.expect("write");
        let ended = tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the connection ends without waiting for the idle timeout")
            .expect("join");
        assert_eq!(
            ended.expect_err("broken pipe").kind(),
            std::io::ErrorKind::BrokenPipe
        );
        // The client's next request finds no one.
        let _ = client.write_all(&binding_request()).await;
        assert_eq!(binding_successes(&turn), 1);
    }

    /// Relayed bytes are billed "in" when written; what a failed
    /// connection never took is counted undelivered instead.
    #[tokio::test]
    async fn relayed_bytes_are_billed_when_written() {
        let turn = crate::turn::tests::server();
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel(16);
        for _ in 0..5 {
            let bytes = Bytes::from_static(&[0u8; 104]);
            tx.try_send(Outbound {
                bytes,
                credit: Some((counters.clone(), 100)),
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
