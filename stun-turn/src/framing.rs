//! Message framing on stream transports (TCP, TLS): RFC 8656 §11.5 and
//! RFC 8489 §6.2.2. A stream carries STUN messages (length from the header,
//! 20 + length bytes) and ChannelData messages (first two bits 01, 4 +
//! length bytes, padded to a multiple of four on streams). UDP datagrams
//! carry exactly one of either.

/// What the next bytes of a stream are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A STUN message of `len` bytes.
    Stun { len: usize },
    /// A ChannelData message: `len` bytes on the wire including padding,
    /// of which `data` bytes of application data follow the 4-byte header.
    ChannelData {
        channel: u16,
        data: usize,
        len: usize,
    },
}

/// The stream cannot be framed any further: the connection must close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("stream carries neither STUN nor ChannelData (first byte {0:#04x})")]
    Garbage(u8),
    #[error("STUN message length {0} is not a multiple of four")]
    UnalignedStun(usize),
}

/// Largest frame this server accepts on any transport.
pub const MAX_FRAME: usize = 4 + 65_535 + 3;

/// Frames the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn next_frame(buf: &[u8], padded: bool) -> Result<Option<Frame>, FramingError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first >> 6 {
        0b00 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let body = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            if body % 4 != 0 {
                return Err(FramingError::UnalignedStun(body));
            }
            let len = 20 + body;
            Ok((buf.len() >= len).then_some(Frame::Stun { len }))
        }
        0b01 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            // 0x4000–0x7FFF: RFC 8656 uses the first 4096, RFC 5766 clients
            // the rest; which numbers are bound is the allocation's call.
            let channel = u16::from_be_bytes([buf[0], buf[1]]);
            let data = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            let len = if padded {
                4 + data.div_ceil(4) * 4
            } else {
                4 + data
            };
            Ok((buf.len() >= len).then_some(Frame::ChannelData { channel, data, len }))
        }
        _ => Err(FramingError::Garbage(first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_stun_and_channel_data() {
        let mut stun = vec![0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xA4, 0x42];
        stun.extend([0; 12 + 4]);
        assert_eq!(next_frame(&stun, true), Ok(Some(Frame::Stun { len: 24 })));
        assert_eq!(next_frame(&stun[..23], true), Ok(None));

        let cd = [0x40, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(
            next_frame(&cd, true),
            Ok(Some(Frame::ChannelData {
                channel: 0x4001,
                data: 5,
                len: 12
            }))
        );
        assert_eq!(next_frame(&cd[..11], true), Ok(None));
        assert_eq!(
            next_frame(&cd[..9], false),
            Ok(Some(Frame::ChannelData {
                channel: 0x4001,
                data: 5,
                len: 9
            }))
        );
        assert_eq!(next_frame(&[], true), Ok(None));
        assert_eq!(next_frame(&[0x40], true), Ok(None));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(
            next_frame(b"\x80UT /", true),
            Err(FramingError::Garbage(0x80))
        );
        assert_eq!(
            next_frame(&[0xC0, 0, 0, 0], true),
            Err(FramingError::Garbage(0xC0))
        );

        assert_eq!(
            next_frame(&[0, 1, 0, 3], true),
            Err(FramingError::UnalignedStun(3))
        );
    }

    proptest! {
        /// Any bytes frame without panicking, and a frame never claims more
        /// bytes than the buffer holds or than the protocol allows.
        #[test]
        fn never_panics_or_overruns(buf in proptest::collection::vec(any::<u8>(), 0..300), padded: bool) {
            if let Ok(Some(frame)) = next_frame(&buf, padded) {
                let len = match frame {
                    Frame::Stun { len } | Frame::ChannelData { len, .. } => len,
                };
                prop_assert!(len <= buf.len());
                prop_assert!(len <= MAX_FRAME);
            }
        }
    }
}
