//! CDR as ROS 2 puts it on the wire: XCDR1 (plain CDR) after a 4-byte
//! encapsulation header, little-endian when the header says so (always, from
//! rmw_zenoh on the machines ROS 2 runs on), big-endian read as well.
//!
//! Alignment counts from the end of the header: a 4-byte value starts at a
//! multiple of 4 of the body. Every read checks its bounds; a length field
//! is checked against the bytes left before anything is allocated.

/// The encapsulation header of little-endian CDR (`CDR_LE`).
pub const CDR_LE: [u8; 4] = [0x00, 0x01, 0x00, 0x00];

/// Why a CDR message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CdrError {
    /// The message is shorter than its encapsulation header.
    #[error("the message is {0} bytes, shorter than the 4-byte CDR encapsulation header")]
    NoHeader(usize),
    /// The header names an encoding this reader does not take.
    #[error("unsupported CDR encapsulation {0:02x}{1:02x} (plain CDR, 0000 or 0001, expected)")]
    Encapsulation(u8, u8),
    /// A field runs past the end of the message.
    #[error(
        "the message ends inside {field}: {need} bytes needed at offset {at}, {len} in the body"
    )]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Where it starts in the body.
        at: usize,
        /// The body's length.
        len: usize,
    },
    /// A string is not NUL-terminated UTF-8.
    #[error("{field} is not a NUL-terminated UTF-8 string")]
    BadString {
        /// The field.
        field: &'static str,
    },
}

/// Reads one CDR message, field by field, in declaration order.
pub struct CdrReader<'a> {
    body: &'a [u8],
    pos: usize,
    little: bool,
}

impl<'a> CdrReader<'a> {
    /// Starts after the encapsulation header.
    pub fn new(msg: &'a [u8]) -> Result<Self, CdrError> {
        if msg.len() < 4 {
            return Err(CdrError::NoHeader(msg.len()));
        }
        let little = match (msg[0], msg[1]) {
            (0, 1) => true,
            (0, 0) => false,
            (a, b) => return Err(CdrError::Encapsulation(a, b)),
        };
        Ok(Self {
            body: &msg[4..],
            pos: 0,
            little,
        })
    }

    /// `n` bytes at `align`, advancing past them.
    fn take(&mut self, n: usize, align: usize, field: &'static str) -> Result<&'a [u8], CdrError> {
        let start = self.pos.next_multiple_of(align);
        let end = start.checked_add(n).filter(|&e| e <= self.body.len());
        let Some(end) = end else {
            return Err(CdrError::Truncated {
                field,
                need: n,
                at: start,
                len: self.body.len(),
            });
        };
        self.pos = end;
        Ok(&self.body[start..end])
    }

    /// An octet (`uint8`, `bool`, `char`).
    pub fn u8(&mut self, field: &'static str) -> Result<u8, CdrError> {
        Ok(self.take(1, 1, field)?[0])
    }

    /// A `uint32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, CdrError> {
        let b: [u8; 4] = self.take(4, 4, field)?.try_into().expect("4 bytes");
        Ok(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    /// An `int32`.
    pub fn i32(&mut self, field: &'static str) -> Result<i32, CdrError> {
        Ok(self.u32(field)? as i32)
    }

    /// A `string`: a length counting the closing NUL, the bytes, the NUL.
    pub fn string(&mut self, field: &'static str) -> Result<&'a str, CdrError> {
        let n = self.u32(field)? as usize;
        if n == 0 {
            // Some writers send an empty string as a bare zero length.
            return Ok("");
        }
        let bytes = self.take(n, 1, field)?;
        let (text, nul) = bytes.split_at(n - 1);
        if nul != [0] {
            return Err(CdrError::BadString { field });
        }
        std::str::from_utf8(text).map_err(|_| CdrError::BadString { field })
    }

    /// A `sequence<uint8>` (`uint8[]`), borrowed from the message.
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], CdrError> {
        let n = self.u32(field)? as usize;
        self.take(n, 1, field)
    }
}

/// Writes one little-endian CDR message, header first.
pub struct CdrWriter {
    buf: Vec<u8>,
}

impl Default for CdrWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CdrWriter {
    /// A message holding only its header.
    pub fn new() -> Self {
        Self {
            buf: CDR_LE.to_vec(),
        }
    }

    fn align(&mut self, n: usize) {
        let body = self.buf.len() - 4;
        self.buf.resize(4 + body.next_multiple_of(n), 0);
    }

    /// An octet.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// A `uint32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// An `int32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.u32(v as u32)
    }

    /// A `string`.
    ///
    /// # Panics
    /// If the text holds a NUL or is over 4 GiB, which no caller sends.
    pub fn string(&mut self, s: &str) -> &mut Self {
        assert!(!s.contains('\0'), "CDR strings cannot hold NUL");
        let n = u32::try_from(s.len() + 1).expect("a string under 4 GiB");
        self.u32(n);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self
    }

    /// A `sequence<uint8>`.
    ///
    /// # Panics
    /// If the bytes are over 4 GiB.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).expect("a sequence under 4 GiB"));
        self.buf.extend_from_slice(b);
        self
    }

    /// The message.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_sequences_round_trip_with_alignment() {
        let mut w = CdrWriter::new();
        w.u8(7)
            .string("hi")
            .u32(0xdead_beef)
            .bytes(&[1, 2, 3])
            .i32(-5);
        let msg = w.finish();
        // u8 at 0, pad to 4, len 3 "hi\0", pad to 12, u32, len at 16, 3 bytes, pad, i32.
        assert_eq!(&msg[..4], &CDR_LE);
        assert_eq!(msg.len(), 4 + 28);
        let mut r = CdrReader::new(&msg).unwrap();
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.string("b").unwrap(), "hi");
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.bytes("d").unwrap(), &[1, 2, 3]);
        assert_eq!(r.i32("e").unwrap(), -5);
    }

    #[test]
    fn big_endian_is_read_too() {
        let msg = [0, 0, 0, 0, 0, 0, 0, 3, b'a', b'b', 0];
        let mut r = CdrReader::new(&msg).unwrap();
        assert_eq!(r.string("s").unwrap(), "ab");
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        assert_eq!(CdrReader::new(&[0, 1]).err(), Some(CdrError::NoHeader(2)));
        assert_eq!(
            CdrReader::new(&[0, 3, 0, 0]).err(),
            Some(CdrError::Encapsulation(0, 3))
        );
        // A length of 4 GiB with 4 bytes behind it: refused before any copy.
        let msg = [0, 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4];
        let err = CdrReader::new(&msg).unwrap().bytes("data").unwrap_err();
        assert!(
            matches!(
                err,
                CdrError::Truncated {
                    field: "data",
                    need: 0xffff_ffff,
                    at: 4,
                    len: 8
                }
            ),
            "{err}"
        );
        let msg = [0, 1, 0, 0, 2, 0, 0, 0, b'a', b'b'];
        assert_eq!(
            CdrReader::new(&msg)
                .unwrap()
                .string("frame_id")
                .unwrap_err(),
            CdrError::BadString { field: "frame_id" }
        );
        let msg = [0, 1, 0, 0, 3, 0, 0, 0, 0xff, 0xfe, 0];
        assert!(CdrReader::new(&msg).unwrap().string("s").is_err());
    }
}
