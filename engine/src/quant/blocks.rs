//! Block layouts of the quantized formats, field for field as in ggml's
//! `ggml-common.h`.
//!
//! Blocks inside a GGUF mmap are packed back to back with no alignment (a Q4_0
//! block is 18 bytes), so they are never viewed in place: [`Block::read`] decodes
//! one from a byte slice (little-endian) and [`Block::write`] encodes it back.
//! The structs are `#[repr(C)]` and their sizes are asserted at compile time, so
//! an in-memory block has exactly the byte layout of the file block.

use std::mem::{offset_of, size_of};

use half::f16;

use super::GgmlType;

/// Values per K-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

/// Values per block of the 32-value formats (`QK4_0` … `QK8_1`).
pub const QK: usize = 32;

/// A quantization block that can be decoded from and encoded to its file bytes.
pub trait Block: Copy + 'static {
    /// The format this block belongs to.
    const TYPE: GgmlType;

    /// Decodes one block.
    ///
    /// # Panics
    /// If `bytes.len()` is not `Self::TYPE.type_size()`.
    fn read(bytes: &[u8]) -> Self;

    /// Encodes the block into `out`.
    ///
    /// # Panics
    /// If `out.len()` is not `Self::TYPE.type_size()`.
    fn write(&self, out: &mut [u8]);
}

/// Q4_0: `x = d * (q - 8)`, q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Byte j holds value j (low nibble) and value j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// Q4_1: `x = d * q + m`, q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Offset (the block minimum).
    pub m: f16,
    /// Byte j holds value j (low nibble) and value j + 16 (high nibble).
    pub qs: [u8; QK / 2],
}

/// Q5_0: `x = d * (q - 16)`, q in 0..32.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bits: bit j of this little-endian u32 belongs to value j.
    pub qh: [u8; 4],
    /// Low four bits, packed as in Q4_0.
    pub qs: [u8; QK / 2],
}

/// Q5_1: `x = d * q + m`, q in 0..32.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Offset (the block minimum).
    pub m: f16,
    /// Fifth bits: bit j of this little-endian u32 belongs to value j.
    pub qh: [u8; 4],
    /// Low four bits, packed as in Q4_0.
    pub qs: [u8; QK / 2],
}

/// Q8_0: `x = d * q`, q in -127..=127.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Values.
    pub qs: [i8; QK],
}

/// Q8_1: Q8_0 plus `s = d * sum(qs)`, which lets Q4_1/Q5_1 dots add their offset
/// without touching the values again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * sum(qs)`.
    pub s: f16,
    /// Values.
    pub qs: [i8; QK],
}

/// Q4_K: eight sub-blocks of 32, `x = d * sc[j] * q - dmin * m[j]`, q in 0..16,
/// with 6-bit sub-block scales `sc` and mins `m`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4_K {
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block mins.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit mins, packed (see [`scale_min_k4`]).
    pub scales: [u8; 12],
    /// Each 32-byte chunk holds 64 values: the first 32 in the low nibbles, the
    /// next 32 in the high nibbles.
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: Q4_K with a fifth bit per value, q in 0..32.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ5_K {
    /// Scale of the sub-block scales.
    pub d: f16,
    /// Scale of the sub-block mins.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit mins, packed (see [`scale_min_k4`]).
    pub scales: [u8; 12],
    /// Fifth bits: bit `2c` / `2c + 1` of byte l belongs to value l of the low /
    /// high nibbles of 32-byte chunk c of `qs`.
    pub qh: [u8; QK_K / 8],
    /// Low four bits, packed as in Q4_K.
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: sixteen sub-blocks of 16, `x = d * scales[j] * (q - 32)`, q in 0..64.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ6_K {
    /// Low four bits. Per 128 values: byte l holds values l (low) and l + 64
    /// (high); byte l + 32 holds values l + 32 and l + 96.
    pub ql: [u8; QK_K / 2],
    /// High two bits. Per 128 values: byte l holds values l, l + 32, l + 64 and
    /// l + 96 in bit pairs 0, 2, 4, 6.
    pub qh: [u8; QK_K / 4],
    /// Signed 8-bit sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Scale of the sub-block scales. Last in the block, unlike the other formats.
    pub d: f16,
}

/// Q8_K: activations for K-quant dots, `x = d * q`, with per-16 sums of `qs` so
/// that the mins of Q4_K/Q5_K cost one multiply per sub-block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_K {
    /// Scale (a full f32, not f16).
    pub d: f32,
    /// Values.
    pub qs: [i8; QK_K],
    /// `bsums[j] = sum(qs[16 * j .. 16 * j + 16])`.
    pub bsums: [i16; QK_K / 16],
}

// The layouts are the file layouts: no padding anywhere, fields where ggml puts them.
const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(size_of::<BlockQ4_K>() == 144);
const _: () = assert!(size_of::<BlockQ5_K>() == 176);
const _: () = assert!(size_of::<BlockQ6_K>() == 210);
const _: () = assert!(size_of::<BlockQ8_K>() == 292);
const _: () = assert!(offset_of!(BlockQ5_1, qs) == 8);
const _: () = assert!(offset_of!(BlockQ5_K, qs) == 48);
const _: () = assert!(offset_of!(BlockQ6_K, d) == 208);
const _: () = assert!(offset_of!(BlockQ8_K, bsums) == 260);

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block
/// (ggml's `get_scale_min_k4`). Sub-blocks 0..4 keep theirs in the low six bits
/// of bytes j and j + 4; sub-blocks 4..8 split theirs between the nibbles of byte
/// j + 4 and the top two bits of bytes j - 4 and j.
pub fn scale_min_k4(j: usize, scales: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// A field's little-endian encoding, consumed from the front of a byte slice.
trait Field: Sized {
    fn read(src: &mut &[u8]) -> Self;
    fn write(&self, dst: &mut &mut [u8]);
}

fn take<const N: usize>(src: &mut &[u8]) -> [u8; N] {
    let (head, tail) = src.split_first_chunk::<N>().expect("block bytes too short");
    *src = tail;
    *head
}

fn put(dst: &mut &mut [u8], bytes: &[u8]) {
    let (head, tail) = std::mem::take(dst).split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    *dst = tail;
}

impl Field for f16 {
    fn read(src: &mut &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes(take(src)))
    }
    fn write(&self, dst: &mut &mut [u8]) {
        put(dst, &self.to_bits().to_le_bytes());
    }
}

impl Field for f32 {
    fn read(src: &mut &[u8]) -> Self {
        f32::from_le_bytes(take(src))
    }
    fn write(&self, dst: &mut &mut [u8]) {
        put(dst, &self.to_le_bytes());
    }
}

impl<const N: usize> Field for [u8; N] {
    fn read(src: &mut &[u8]) -> Self {
        take(src)
    }
    fn write(&self, dst: &mut &mut [u8]) {
        put(dst, self);
    }
}

impl<const N: usize> Field for [i8; N] {
    fn read(src: &mut &[u8]) -> Self {
        take::<N>(src).map(|b| b as i8)
    }
    fn write(&self, dst: &mut &mut [u8]) {
        put(dst, &self.map(|v| v as u8));
    }
}

impl<const N: usize> Field for [i16; N] {
    fn read(src: &mut &[u8]) -> Self {
        std::array::from_fn(|_| i16::from_le_bytes(take(src)))
    }
    fn write(&self, dst: &mut &mut [u8]) {
        for v in self {
            put(dst, &v.to_le_bytes());
        }
    }
}

const fn field_size<S, F>(_: fn(&S) -> &F) -> usize {
    size_of::<F>()
}

/// Implements [`Block`] by reading and writing the listed fields in turn.
macro_rules! impl_block {
    ($name:ident, $ty:ident, [$($field:ident),+]) => {
        // The fields listed here tile the struct in order, so reading them in
        // this order reads the file layout.
        const _: () = {
            let mut at = 0;
            $(
                assert!(offset_of!($name, $field) == at);
                at += field_size(|b: &$name| &b.$field);
            )+
            assert!(at == size_of::<$name>());
            assert!(at == GgmlType::$ty.type_size());
        };

        impl Block for $name {
            const TYPE: GgmlType = GgmlType::$ty;

            fn read(bytes: &[u8]) -> Self {
                assert_eq!(bytes.len(), size_of::<Self>(), "{} block size", Self::TYPE);
                let mut src = bytes;
                Self { $($field: Field::read(&mut src)),+ }
            }

            fn write(&self, out: &mut [u8]) {
                assert_eq!(out.len(), size_of::<Self>(), "{} block size", Self::TYPE);
                let mut dst = out;
                $(Field::write(&self.$field, &mut dst);)+
            }
        }
    };
}

impl_block!(BlockQ4_0, Q4_0, [d, qs]);
impl_block!(BlockQ4_1, Q4_1, [d, m, qs]);
impl_block!(BlockQ5_0, Q5_0, [d, qh, qs]);
impl_block!(BlockQ5_1, Q5_1, [d, m, qh, qs]);
impl_block!(BlockQ8_0, Q8_0, [d, qs]);
impl_block!(BlockQ8_1, Q8_1, [d, s, qs]);
impl_block!(BlockQ4_K, Q4_K, [d, dmin, scales, qs]);
impl_block!(BlockQ5_K, Q5_K, [d, dmin, scales, qh, qs]);
impl_block!(BlockQ6_K, Q6_K, [ql, qh, scales, d]);
impl_block!(BlockQ8_K, Q8_K, [d, qs, bsums]);
