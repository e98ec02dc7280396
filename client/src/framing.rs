//! Reading and writing [`Frame`]s on an async byte stream (the daemon uses
//! these too, so both sides frame alike).
//!
//! A reader waits as long as it likes for the first byte of a frame, but once
//! a frame has begun the rest must arrive within a time limit, so a peer that
//! stops halfway through a frame cannot hold a connection forever.

use std::time::Duration;

use embody_protocol::wire::{self, Frame, FrameError, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("reading from the socket: {0}")]
    Io(#[from] std::io::Error),
    /// A frame began but did not complete in time.
    #[error("incomplete frame: {got} of {needed} bytes arrived, then nothing for {after:?}")]
    Stalled {
        /// Bytes of the frame that arrived.
        got: usize,
        /// Bytes the frame needs (the header's size until the header is complete).
        needed: usize,
        /// The time limit.
        after: Duration,
    },
}

/// Reads up to `buf.len()` bytes, fewer only at end of stream, counting
/// them into `count` as they arrive.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    count: &mut usize,
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await? {
            0 => break,
            k => {
                n += k;
                *count += k;
            }
        }
    }
    Ok(n)
}

/// Reads one frame. Returns `None` when the stream ends cleanly between
/// frames. Once a frame's first byte has arrived, the rest must follow
/// within `stall`.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    stall: Duration,
) -> Result<Option<Frame>, ReadError> {
    let mut header = [0u8; HEADER_LEN];
    if r.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    let mut got = 1;
    let mut needed = HEADER_LEN;
    let rest = async {
        read_full(r, &mut header[1..], &mut got).await?;
        if got < HEADER_LEN {
            return Err(FrameError::Truncated { needed, got }.into());
        }
        let h = wire::decode_header(&header)?;
        needed = HEADER_LEN + h.body_len();
        let mut body = vec![0u8; h.body_len()];
        let n = read_full(r, &mut body, &mut got).await?;
        if n < body.len() {
            return Err(FrameError::Truncated { needed, got }.into());
        }
        let (meta, attachments) = body.split_at(h.meta_len);
        Ok(wire::decode_body(&h, meta, attachments)?)
    };
    let result = tokio::time::timeout(stall, rest).await;
    match result {
        Ok(result) => result.map(Some),
        Err(_) => Err(ReadError::Stalled {
            got,
            needed,
            after: stall,
        }),
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The frame cannot be encoded (over the size limits).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed (the peer is gone).
    #[error("writing to the socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes and writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), WriteError> {
    let bytes = wire::encode(frame)?;
    w.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embody_protocol::wire::encode;

    #[tokio::test]
    async fn frames_read_back_and_end_of_stream_is_none() {
        let mut bytes = encode(&Frame::Cancel { id: 4 }).unwrap();
        bytes.extend(encode(&Frame::Status { id: 5 }).unwrap());
        let mut r = &bytes[..];
        let t = Duration::from_secs(1);
        assert_eq!(
            read_frame(&mut r, t).await.unwrap(),
            Some(Frame::Cancel { id: 4 })
        );
        assert_eq!(
            read_frame(&mut r, t).await.unwrap(),
            Some(Frame::Status { id: 5 })
        );
        assert!(read_frame(&mut r, t).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_frame_cut_short_is_truncated() {
        let bytes = encode(&Frame::Status { id: 5 }).unwrap();
        for cut in [3, HEADER_LEN, bytes.len() - 1] {
            let mut r = &bytes[..cut];
            match read_frame(&mut r, Duration::from_secs(1)).await {
                Err(ReadError::Frame(FrameError::Truncated { needed, got })) => {
                    assert_eq!(got, cut);
                    assert_eq!(
                        needed,
                        if cut < HEADER_LEN {
                            HEADER_LEN
                        } else {
                            bytes.len()
                        }
                    );
                }
                other => panic!("{cut}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_stalled_frame_times_out() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"EMB").await.unwrap();
        let err = read_frame(&mut b, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ReadError::Stalled {
                    got: 3,
                    needed: HEADER_LEN,
                    ..
                }
            ),
            "{err:?}"
        );
        drop(a);
    }
}
