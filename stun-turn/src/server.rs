//! Socket drivers: UDP sockets (several on one port with SO_REUSEPORT, so
//! the kernel spreads clients over cores) and TCP and TLS acceptors with a
//! reader and a writer task per connection. They read bytes, frame them, and hand
//! them to [`Turn`].

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

use crate::allocation::{ClientSink, Transport};
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

/// Spawns the socket tasks.
pub(crate) fn serve(
    turn: Arc<Turn>,
    udp: Vec<UdpSocket>,
    tcp: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
    shutdown: Shutdown,
) -> Vec<JoinHandle<()>> {
    let mut tasks: Vec<JoinHandle<()>> = udp
        .into_iter()
        .map(|s| tokio::spawn(udp_loop(turn.clone(), Arc::new(s), shutdown.clone())))
        .collect();
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

async fn udp_loop(turn: Arc<Turn>, socket: Arc<UdpSocket>, shutdown: Shutdown) {
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
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Bytes>(TCP_QUEUE);
    let write_task = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if writer.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let sink = ClientSink::Stream(tx.clone());
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut filled = 0;
    let result = loop {
        let n = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
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
        let framing_error = loop {
            match framing::next_frame(&buf[start..filled], true) {
                Ok(Some(Frame::Stun { len })) => {
                    if let Some(resp) = turn
                        .on_stun(&buf[start..start + len], from, transport, &sink)
                        .await
                        && tx.send(Bytes::from(resp)).await.is_err()
                    {
                        break None;
                    }
                    start += len;
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
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = framing_error {
            turn.metrics
                .discarded
                .with_label_values(&["bad_framing"])
                .inc();
            break Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    };
    drop(sink);
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), write_task).await;
    result
}
