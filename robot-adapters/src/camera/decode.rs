//! One camera message to one checked [`Frame`]: the size is checked before
//! anything is decoded, image headers are checked against the camera's
//! limits before pixels are allocated, and the whole image is decoded once
//! so a corrupt frame is refused here instead of failing a request later.
//!
//! JPEG and PNG frames keep their original bytes; raw pixels (the raw
//! formats, `sensor_msgs/Image`) are stored as an uncompressed PNG.

use std::io::Cursor;
use std::time::SystemTime;

use embody_actors::Frame;
use embody_protocol::Image;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, ImageFormat, ImageReader, Limits};

use crate::config::{CameraConfig, CameraFormat};
use crate::ros2::cdr::CdrError;
use crate::ros2::msgs;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The message is over the camera's `max_bytes`.
    #[error("the message is {len} bytes, over the camera's max_bytes = {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Raw pixels do not fill the configured size exactly.
    #[error("a raw {format} frame of {width}x{height} needs {want} bytes, the message has {got}")]
    WrongSize {
        /// The pixel format.
        format: &'static str,
        /// Configured width.
        width: u32,
        /// Configured height.
        height: u32,
        /// Bytes expected.
        want: usize,
        /// Bytes received.
        got: usize,
    },
    /// The image is wider or taller than the camera allows.
    #[error("the image is {width}x{height}, over the camera's max_dimension = {max}")]
    TooBig {
        /// Width from the header.
        width: u32,
        /// Height from the header.
        height: u32,
        /// The limit.
        max: u32,
    },
    /// The image could not be decoded.
    #[error("the {format} image cannot be decoded: {why}")]
    Decode {
        /// "JPEG" or "PNG".
        format: &'static str,
        /// The decoder's reason.
        why: String,
    },
    /// The ROS 2 message is malformed.
    #[error("malformed {ty}: {source}")]
    Cdr {
        /// The message type.
        ty: &'static str,
        /// What is wrong.
        source: CdrError,
    },
    /// The ROS 2 image's layout is inconsistent or unsupported.
    #[error("sensor_msgs/msg/Image: {0}")]
    Layout(String),
}

/// Decodes one message of a camera into a frame. `arrived` stamps frames
/// whose message carries no stamp of its own.
pub fn decode(
    cfg: &CameraConfig,
    payload: &[u8],
    arrived: SystemTime,
) -> Result<Frame, FrameError> {
    if payload.len() > cfg.max_bytes {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: cfg.max_bytes,
        });
    }
    match cfg.format {
        CameraFormat::Rgb8 | CameraFormat::Bgr8 => {
            let (w, h) = (cfg.width, cfg.height);
            let want = w as usize * h as usize * 3;
            let name = if cfg.format == CameraFormat::Rgb8 {
                "rgb8"
            } else {
                "bgr8"
            };
            if payload.len() != want {
                return Err(FrameError::WrongSize {
                    format: name,
                    width: w,
                    height: h,
                    want,
                    got: payload.len(),
                });
            }
            let rgb = if cfg.format == CameraFormat::Bgr8 {
                swap_rb(payload, 3)
            } else {
                payload.to_vec()
            };
            Ok(raw_frame(&rgb, w, h, arrived))
        }
        CameraFormat::Jpeg => encoded(cfg, payload, ImageFormat::Jpeg, arrived),
        CameraFormat::Png => encoded(cfg, payload, ImageFormat::Png, arrived),
        CameraFormat::Ros2Image => {
            let img = msgs::read_image(payload).map_err(|source| FrameError::Cdr {
                ty: msgs::IMAGE.name,
                source,
            })?;
            let stamp = img.header.stamp().unwrap_or(arrived);
            ros_image(cfg, &img, stamp)
        }
        CameraFormat::Ros2CompressedImage => {
            let img = msgs::read_compressed_image(payload).map_err(|source| FrameError::Cdr {
                ty: msgs::COMPRESSED_IMAGE.name,
                source,
            })?;
            let stamp = img.header.stamp().unwrap_or(arrived);
            let format = if img.format.contains("png") {
                ImageFormat::Png
            } else {
                ImageFormat::Jpeg
            };
            encoded(cfg, img.data, format, stamp)
        }
    }
}

/// The body of the camera fuzz target and its corpus replay: the first byte
/// picks the camera's format (raw RGB/BGR 8x6, JPEG, PNG, ROS 2 Image,
/// ROS 2 CompressedImage), the rest is the message. A frame that is accepted
/// is within the camera's limits and its image decodes; nothing panics.
pub fn exercise(data: &[u8]) {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let format = [
        CameraFormat::Rgb8,
        CameraFormat::Bgr8,
        CameraFormat::Jpeg,
        CameraFormat::Png,
        CameraFormat::Ros2Image,
        CameraFormat::Ros2CompressedImage,
    ][usize::from(pick) % 6];
    let cfg = CameraConfig {
        name: "fuzz".into(),
        key: "fuzz".into(),
        format,
        width: 8,
        height: 6,
        max_bytes: 1 << 20,
        max_dimension: 256,
    };
    if let Ok(frame) = decode(&cfg, payload, SystemTime::UNIX_EPOCH) {
        assert!(
            frame.width <= 256 && frame.height <= 256,
            "within the limits"
        );
        let decoded = image::load_from_memory(&frame.image.data).expect("a frame decodes");
        assert_eq!(
            (decoded.width(), decoded.height()),
            (frame.width, frame.height)
        );
    }
}

/// Checks and decodes a JPEG or PNG; the frame keeps the original bytes.
fn encoded(
    cfg: &CameraConfig,
    data: &[u8],
    format: ImageFormat,
    stamp: SystemTime,
) -> Result<Frame, FrameError> {
    let name = if format == ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    };
    let err = |why: String| FrameError::Decode { format: name, why };
    // Requests decode a frame by its leading bytes: a frame a lenient decoder
    // reads without them would fail there instead of here.
    if image::guess_format(data).ok() != Some(format) {
        return Err(err(format!(
            "the data does not start as a {name} file does"
        )));
    }
    let max = cfg.max_dimension;
    // Header first: the dimensions decide whether pixels are allocated at all.
    let (width, height) = ImageReader::with_format(Cursor::new(data), format)
        .into_dimensions()
        .map_err(|e| err(e.to_string()))?;
    if width > max || height > max {
        return Err(FrameError::TooBig { width, height, max });
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(max);
    limits.max_image_height = Some(max);
    limits.max_alloc = Some(u64::from(max) * u64::from(max) * 4 + (16 << 20));
    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    reader.limits(limits);
    reader.decode().map_err(|e| err(e.to_string()))?;
    Ok(Frame {
        image: Image {
            media_type: if format == ImageFormat::Png {
                "image/png"
            } else {
                "image/jpeg"
            }
            .into(),
            data: data.to_vec(),
        },
        width,
        height,
        stamp,
    })
}

/// A `sensor_msgs/Image` of an 8-bit encoding, as RGB.
fn ros_image(
    cfg: &CameraConfig,
    img: &msgs::Image<'_>,
    stamp: SystemTime,
) -> Result<Frame, FrameError> {
    let (w, h, max) = (img.width, img.height, cfg.max_dimension);
    if w == 0 || h == 0 {
        return Err(FrameError::Layout(format!("the image is empty ({w}x{h})")));
    }
    if w > max || h > max {
        return Err(FrameError::TooBig {
            width: w,
            height: h,
            max,
        });
    }
    let channels = match img.encoding {
        "rgb8" | "bgr8" => 3,
        "rgba8" | "bgra8" => 4,
        "mono8" | "8UC1" => 1,
        other => {
            return Err(FrameError::Layout(format!(
                "encoding '{other}' is not supported (rgb8, bgr8, rgba8, bgra8 and mono8 are)"
            )))
        }
    };
    let row = w as usize * channels;
    let step = img.step as usize;
    if step < row {
        return Err(FrameError::Layout(format!(
            "step {step} is shorter than a row of {w} {} pixels ({row} bytes)",
            img.encoding
        )));
    }
    if img.data.len() != step * h as usize {
        return Err(FrameError::Layout(format!(
            "{} bytes of data, step {step} x height {h} = {} expected",
            img.data.len(),
            step * h as usize
        )));
    }
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for r in 0..h as usize {
        let line = &img.data[r * step..r * step + row];
        match img.encoding {
            "rgb8" => rgb.extend_from_slice(line),
            "mono8" | "8UC1" => line.iter().for_each(|&v| rgb.extend_from_slice(&[v, v, v])),
            enc => {
                let bgr = enc.starts_with("bgr");
                for px in line.chunks_exact(channels) {
                    if bgr {
                        rgb.extend_from_slice(&[px[2], px[1], px[0]]);
                    } else {
                        rgb.extend_from_slice(&px[..3]);
                    }
                }
            }
        }
    }
    Ok(raw_frame(&rgb, w, h, stamp))
}

fn swap_rb(px: &[u8], channels: usize) -> Vec<u8> {
    let mut out = px.to_vec();
    out.chunks_exact_mut(channels).for_each(|p| p.swap(0, 2));
    out
}

/// Raw RGB pixels as a PNG frame. Stored, not compressed: the frame lives
/// in memory only, and deflating 640x480 pixels costs ~50 ms where storing
/// them costs ~1 ms, at every frame of a 30 Hz camera.
fn raw_frame(rgb: &[u8], width: u32, height: u32, stamp: SystemTime) -> Frame {
    let mut png = Vec::with_capacity(rgb.len() + (rgb.len() >> 8) + 1024);
    PngEncoder::new_with_quality(
        &mut png,
        CompressionType::Uncompressed,
        FilterType::NoFilter,
    )
    .write_image(rgb, width, height, ExtendedColorType::Rgb8)
    .expect("encoding RGB pixels of a checked size as PNG into memory");
    Frame {
        image: Image {
            media_type: "image/png".into(),
            data: png,
        },
        width,
        height,
        stamp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cam(format: CameraFormat) -> CameraConfig {
        CameraConfig {
            name: "front".into(),
            key: "cam".into(),
            format,
            width: 4,
            height: 2,
            max_bytes: 1 << 20,
            max_dimension: 256,
        }
    }

    fn png_of(w: u32, h: u32) -> Vec<u8> {
        raw_frame(&vec![200; (w * h * 3) as usize], w, h, SystemTime::now())
            .image
            .data
    }

    #[test]
    fn raw_frames_must_fill_the_configured_size() {
        let t = SystemTime::now();
        let f = decode(&cam(CameraFormat::Bgr8), &[1, 2, 3].repeat(8), t).unwrap();
        assert_eq!((f.width, f.height, f.stamp), (4, 2, t));
        let rgb = image::load_from_memory(&f.image.data).unwrap().to_rgb8();
        assert_eq!(rgb.get_pixel(0, 0).0, [3, 2, 1]);
        let e = decode(&cam(CameraFormat::Rgb8), &[0; 23], t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a raw rgb8 frame of 4x2 needs 24 bytes, the message has 23"
        );
    }

    #[test]
    fn oversized_and_corrupt_images_are_refused_before_allocating() {
        let t = SystemTime::now();
        let e = decode(&cam(CameraFormat::Jpeg), &vec![0; (1 << 20) + 1], t).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");

        let good = png_of(3, 3);
        assert!(decode(&cam(CameraFormat::Png), &good, t).is_ok());
        let mut corrupt = good.clone();
        let n = corrupt.len();
        corrupt[n / 2..n - 12].iter_mut().for_each(|b| *b ^= 0x5a);
        let e = decode(&cam(CameraFormat::Png), &corrupt, t).unwrap_err();
        assert!(
            e.to_string().starts_with("the PNG image cannot be decoded"),
            "{e}"
        );

        // A PNG header claiming 60000x60000, with a few bytes of pixels behind it.
        let mut huge = Vec::new();
        let mut w = png::Encoder::new(&mut huge, 60_000, 60_000)
            .write_header()
            .unwrap();
        w.write_chunk(png::chunk::IDAT, &[0x78, 0x01, 0, 0, 0xff, 0xff])
            .unwrap();
        drop(w);
        let e = decode(&cam(CameraFormat::Png), &huge, t).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooBig {
                    width: 60_000,
                    height: 60_000,
                    max: 256
                }
            ),
            "{e}"
        );
        // A JPEG whose frame header claims 60000x60000.
        let mut jpeg = vec![
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 8, 0xEA, 0x60, 0xEA, 0x60, 3,
        ];
        jpeg.extend_from_slice(&[1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0, 0xFF, 0xD9]);
        let e = decode(&cam(CameraFormat::Jpeg), &jpeg, t).unwrap_err();
        assert!(
            matches!(e, FrameError::TooBig { .. } | FrameError::Decode { .. }),
            "{e}"
        );
    }

    #[test]
    fn ros_images_take_their_header_stamp() {
        let px: Vec<u8> = (0..2 * 8).map(|i| i as u8).collect();
        let msg = msgs::write_image(&msgs::Image {
            header: msgs::Header {
                sec: 1_700_000_000,
                nanosec: 0,
                frame_id: "cam",
            },
            height: 2,
            width: 2,
            encoding: "bgra8",
            is_bigendian: 0,
            step: 8,
            data: &px,
        });
        let f = decode(&cam(CameraFormat::Ros2Image), &msg, SystemTime::now()).unwrap();
        assert_eq!(
            f.stamp,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        let rgb = image::load_from_memory(&f.image.data).unwrap().to_rgb8();
        assert_eq!(rgb.get_pixel(1, 0).0, [6, 5, 4]);
        let e = decode(
            &cam(CameraFormat::Ros2Image),
            &msg[..msg.len() - 1],
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("malformed sensor_msgs/msg/Image"),
            "{e}"
        );
    }
}
