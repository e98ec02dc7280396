//! The ROS 2 messages embodyd speaks, their type names as rmw_zenoh spells
//! them in key expressions, and their RIHS01 type hashes.
//!
//! The hashes are those of ROS 2 Jazzy's message definitions; an interop
//! test computes them again with `rosbags` and compares.

use std::time::{Duration, SystemTime};

use super::cdr::{CdrError, CdrReader, CdrWriter};

/// A message type: its ROS name, the name rmw_zenoh puts in key expressions,
/// and its type hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RosType {
    /// As ROS names it: `std_msgs/msg/String`.
    pub name: &'static str,
    /// As rmw_zenoh's keys name it: `std_msgs::msg::dds_::String_`.
    pub dds_name: &'static str,
    /// The RIHS01 hash of its definition.
    pub hash: &'static str,
}

/// `std_msgs/msg/String`.
pub const STRING: RosType = RosType {
    name: "std_msgs/msg/String",
    dds_name: "std_msgs::msg::dds_::String_",
    hash: "RIHS01_df668c740482bbd48fb39d76a70dfd4bd59db1288021743503259e948f6b1a18",
};

/// `sensor_msgs/msg/Image`.
pub const IMAGE: RosType = RosType {
    name: "sensor_msgs/msg/Image",
    dds_name: "sensor_msgs::msg::dds_::Image_",
    hash: "RIHS01_d31d41a9a4c4bc8eae9be757b0beed306564f7526c88ea6a4588fb9582527d47",
};

/// `sensor_msgs/msg/CompressedImage`.
pub const COMPRESSED_IMAGE: RosType = RosType {
    name: "sensor_msgs/msg/CompressedImage",
    dds_name: "sensor_msgs::msg::dds_::CompressedImage_",
    hash: "RIHS01_15640771531571185e2efc8a100baf923961a4d15d5569652e6cb6691e8e371a",
};

/// `std_msgs/msg/Header`: when and in which frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header<'a> {
    /// Seconds of the stamp (`builtin_interfaces/Time.sec`).
    pub sec: i32,
    /// Nanoseconds of the stamp.
    pub nanosec: u32,
    /// The coordinate frame.
    pub frame_id: &'a str,
}

impl Header<'_> {
    fn read<'a>(r: &mut CdrReader<'a>) -> Result<Header<'a>, CdrError> {
        Ok(Header {
            sec: r.i32("header.stamp.sec")?,
            nanosec: r.u32("header.stamp.nanosec")?,
            frame_id: r.string("header.frame_id")?,
        })
    }

    /// The stamp as a time, if it is set (a zero stamp means "not set") and
    /// valid.
    pub fn stamp(&self) -> Option<SystemTime> {
        if (self.sec, self.nanosec) == (0, 0) || self.sec < 0 || self.nanosec >= 1_000_000_000 {
            return None;
        }
        Some(SystemTime::UNIX_EPOCH + Duration::new(self.sec as u64, self.nanosec))
    }
}

/// Reads a `std_msgs/msg/String`.
pub fn read_string(msg: &[u8]) -> Result<&str, CdrError> {
    CdrReader::new(msg)?.string("data")
}

/// Writes a `std_msgs/msg/String`. NUL characters (which CDR strings cannot
/// hold) are dropped.
pub fn write_string(text: &str) -> Vec<u8> {
    let mut w = CdrWriter::new();
    if text.contains('\0') {
        w.string(&text.replace('\0', ""));
    } else {
        w.string(text);
    }
    w.finish()
}

/// A `sensor_msgs/msg/Image`, its pixels borrowed from the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image<'a> {
    /// Header.
    pub header: Header<'a>,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
    /// Pixel encoding ("rgb8", "bgr8", "mono8", ...).
    pub encoding: &'a str,
    /// Whether multi-byte pixels are big-endian.
    pub is_bigendian: u8,
    /// Bytes per row.
    pub step: u32,
    /// The pixels, `step * height` bytes.
    pub data: &'a [u8],
}

/// Reads a `sensor_msgs/msg/Image`.
pub fn read_image(msg: &[u8]) -> Result<Image<'_>, CdrError> {
    let mut r = CdrReader::new(msg)?;
    Ok(Image {
        header: Header::read(&mut r)?,
        height: r.u32("height")?,
        width: r.u32("width")?,
        encoding: r.string("encoding")?,
        is_bigendian: r.u8("is_bigendian")?,
        step: r.u32("step")?,
        data: r.bytes("data")?,
    })
}

/// A `sensor_msgs/msg/CompressedImage`, its bytes borrowed from the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompressedImage<'a> {
    /// Header.
    pub header: Header<'a>,
    /// "jpeg" or "png" (image_transport may add details: "rgb8; jpeg compressed bgr8").
    pub format: &'a str,
    /// The encoded image.
    pub data: &'a [u8],
}

/// Reads a `sensor_msgs/msg/CompressedImage`.
pub fn read_compressed_image(msg: &[u8]) -> Result<CompressedImage<'_>, CdrError> {
    let mut r = CdrReader::new(msg)?;
    Ok(CompressedImage {
        header: Header::read(&mut r)?,
        format: r.string("format")?,
        data: r.bytes("data")?,
    })
}

/// Writes a `sensor_msgs/msg/Image` (for tests and tools).
pub fn write_image(img: &Image<'_>) -> Vec<u8> {
    let mut w = CdrWriter::new();
    w.i32(img.header.sec)
        .u32(img.header.nanosec)
        .string(img.header.frame_id)
        .u32(img.height)
        .u32(img.width)
        .string(img.encoding)
        .u8(img.is_bigendian)
        .u32(img.step)
        .bytes(img.data);
    w.finish()
}

/// Writes a `sensor_msgs/msg/CompressedImage` (for tests and tools).
pub fn write_compressed_image(img: &CompressedImage<'_>) -> Vec<u8> {
    let mut w = CdrWriter::new();
    w.i32(img.header.sec)
        .u32(img.header.nanosec)
        .string(img.header.frame_id)
        .string(img.format)
        .bytes(img.data);
    w.finish()
}

/// Feeds arbitrary bytes to every message reader (the fuzz target's body):
/// none may panic, and what reads back must write back to an equal message.
pub fn exercise(data: &[u8]) {
    if let Ok(s) = read_string(data) {
        if !s.contains('\0') {
            assert_eq!(read_string(&write_string(s)).ok(), Some(s));
        }
    }
    if let Ok(img) = read_image(data) {
        if !img.header.frame_id.contains('\0') && !img.encoding.contains('\0') {
            let again = write_image(&img);
            assert_eq!(read_image(&again).as_ref(), Ok(&img));
        }
    }
    if let Ok(img) = read_compressed_image(data) {
        if !img.header.frame_id.contains('\0') && !img.format.contains('\0') {
            let again = write_compressed_image(&img);
            assert_eq!(read_compressed_image(&again).as_ref(), Ok(&img));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_is_what_rosbags_writes() {
        // rosbags: serialize_cdr(String(data='hi'), 'std_msgs/msg/String').
        let want = [0x00, 0x01, 0x00, 0x00, 0x03, 0, 0, 0, b'h', b'i', 0];
        assert_eq!(write_string("hi"), want);
        assert_eq!(read_string(&want), Ok("hi"));
    }

    #[test]
    fn images_round_trip_and_carry_their_stamp() {
        let px = [1u8, 2, 3, 4, 5, 6];
        let img = Image {
            header: Header {
                sec: 1_700_000_000,
                nanosec: 5_000_000,
                frame_id: "cam",
            },
            height: 1,
            width: 2,
            encoding: "rgb8",
            is_bigendian: 0,
            step: 6,
            data: &px,
        };
        let msg = write_image(&img);
        let back = read_image(&msg).unwrap();
        assert_eq!(back, img);
        assert_eq!(
            back.header.stamp(),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5_000_000))
        );
        let zero = Header {
            sec: 0,
            nanosec: 0,
            frame_id: "",
        };
        assert_eq!(zero.stamp(), None);
        // Cut anywhere, the message is an error, never a panic.
        for cut in 0..msg.len() {
            assert!(read_image(&msg[..cut]).is_err(), "cut at {cut}");
        }
    }
}
