//! A TURN client transport over TCP: a [`Conn`] that frames STUN messages
//! and ChannelData on one stream as RFC 8656 §12.5 lays out, so the
//! webrtc-rs TURN client (written for datagrams) can reach a TURN server
//! over TCP. Each `recv_from` yields exactly one STUN message or one
//! ChannelData message (without its padding); each `send_to` writes one
//! whole message, whatever address it names (a stream has one peer).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use webrtc_util::{Conn, Error};

/// STUN header: type, length, magic cookie, transaction id.
const STUN_HEADER: usize = 20;
/// ChannelData header: channel number, length.
const CHANNEL_HEADER: usize = 4;

/// One TCP connection to a TURN server.
pub struct StreamConn {
    reader: Mutex<BufReader<OwnedReadHalf>>,
    writer: Mutex<OwnedWriteHalf>,
    local: SocketAddr,
    remote: SocketAddr,
}

impl StreamConn {
    /// Connects to `server`.
    pub async fn connect(server: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let (local, remote) = (stream.local_addr()?, stream.peer_addr()?);
        let (r, w) = stream.into_split();
        Ok(Self {
            reader: Mutex::new(BufReader::with_capacity(4_096, r)),
            writer: Mutex::new(w),
            local,
            remote,
        })
    }
}

/// How many bytes the message starting with `header` occupies on the
/// stream, and how many of them are the message (the rest is padding).
pub fn frame_len(header: [u8; 4]) -> Result<(usize, usize), Error> {
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    match header[0] >> 6 {
        // STUN: the length excludes the header and is a multiple of 4.
        0b00 => Ok((STUN_HEADER + len, STUN_HEADER + len)),
        // ChannelData (0x4000–0x4FFF): padded to 4 bytes over streams.
        0b01 => Ok((
            CHANNEL_HEADER + len.next_multiple_of(4),
            CHANNEL_HEADER + len,
        )),
        _ => Err(Error::Other(format!(
            "stream carries neither STUN nor ChannelData (first byte {:#04x})",
            header[0]
        ))),
    }
}

#[async_trait::async_trait]
impl Conn for StreamConn {
    async fn connect(&self, _addr: SocketAddr) -> Result<(), Error> {
        Err(Error::Other("a stream is connected once".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        self.recv_from(buf).await.map(|(n, _)| n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), Error> {
        let mut reader = self.reader.lock().await;
        let mut header = [0u8; 4];
        reader.read_exact(&mut header).await?;
        let (on_wire, message) = frame_len(header)?;
        if message > buf.len() {
            return Err(Error::ErrBufferShort);
        }
        buf[..4].copy_from_slice(&header);
        reader.read_exact(&mut buf[4..message]).await?;
        let mut padding = [0u8; 3];
        reader.read_exact(&mut padding[..on_wire - message]).await?;
        Ok((message, self.remote))
    }

    async fn send(&self, buf: &[u8]) -> Result<usize, Error> {
        self.writer.lock().await.write_all(buf).await?;
        Ok(buf.len())
    }

    async fn send_to(&self, buf: &[u8], _target: SocketAddr) -> Result<usize, Error> {
        self.send(buf).await
    }

    fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }

    async fn close(&self) -> Result<(), Error> {
        self.writer.lock().await.shutdown().await?;
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_frames_are_header_plus_length() {
        // Binding request with 8 bytes of attributes.
        assert_eq!(frame_len([0x00, 0x01, 0x00, 0x08]), Ok((28, 28)));
    }

    #[test]
    fn channel_data_is_padded_to_four_on_streams() {
        assert_eq!(frame_len([0x40, 0x00, 0x00, 0x05]), Ok((12, 9)));
        assert_eq!(frame_len([0x4f, 0xff, 0x00, 0x08]), Ok((12, 12)));
        assert_eq!(frame_len([0x40, 0x00, 0x00, 0x00]), Ok((4, 4)));
    }

    #[test]
    fn other_first_bits_are_refused() {
        assert!(frame_len([0x80, 0, 0, 0]).is_err());
        assert!(frame_len([0xc0, 0, 0, 0]).is_err());
    }

    /// A server that writes two padded ChannelData messages and a STUN
    /// message in one burst; the client reads them back one at a time.
    #[tokio::test]
    async fn reads_one_message_per_call_from_a_burst() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut burst = vec![0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
            burst.extend_from_slice(&[0x40, 0x02, 0x00, 0x04, 1, 2, 3, 4]);
            let mut stun = vec![0x01, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
            stun.extend_from_slice(&[7; 12]);
            burst.extend_from_slice(&stun);
            s.write_all(&burst).await.expect("write");
            let mut echo = [0u8; 8];
            s.read_exact(&mut echo).await.expect("read");
            echo
        });
        let conn = StreamConn::connect(addr).await.expect("connect");
        let mut buf = [0u8; 64];
        let (n, from) = conn.recv_from(&mut buf).await.expect("first");
        assert_eq!(
            (&buf[..n], from),
            (&[0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c'][..], addr)
        );
        let n = conn.recv(&mut buf).await.expect("second");
        assert_eq!(&buf[..n], &[0x40, 0x02, 0x00, 0x04, 1, 2, 3, 4]);
        let n = conn.recv(&mut buf).await.expect("third");
        assert_eq!((n, buf[0], buf[1]), (20, 0x01, 0x01));
        let mut small = [0u8; 2];
        conn.send_to(&[9; 8], addr).await.expect("send");
        assert_eq!(server.await.expect("server"), [9; 8]);
        // The stream ended: a clear error, not a hang.
        assert!(conn.recv(&mut small).await.is_err());
    }
}
