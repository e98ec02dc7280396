//! A reader for GGUF files (llama.cpp's model format), versions 2 and 3.
//!
//! The file is memory-mapped and parsed once: metadata into typed values,
//! tensor infos into names, types, shapes and byte ranges; the tensor data is
//! then copied into memory of its own where there is room for it. The file is
//! untrusted input, so every length, count and offset is checked against the
//! bytes that remain before anything is read or allocated; a bad file gives
//! [`Error::Gguf`] naming the file and, where there is one, the tensor or key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::quant::GgmlType;
use crate::tensor::{Bytes, FileBytes, QTensor};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nested deeper than this are rejected (real files nest at most once).
const MAX_ARRAY_DEPTH: usize = 4;
const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float32`
    F32(f32),
    /// `float64`
    F64(f64),
    /// `bool`
    Bool(bool),
    /// UTF-8 string (invalid UTF-8 is replaced, as tokens of some files contain it).
    String(String),
    /// Array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A short description for listings: scalars in full, arrays by length.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(77).collect();
                format!("{head:?}...")
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => {
                let head: Vec<String> = a.iter().take(3).map(Value::summary).collect();
                let more = if a.len() > 3 { ", ..." } else { "" };
                format!("[{}{more}] ({} items)", head.join(", "), a.len())
            }
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where a tensor lies in the file and what it holds.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name as written in the file.
    pub name: String,
    /// Element format.
    pub ty: GgmlType,
    /// Dimensions, innermost first.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of data.
    pub size: usize,
}

/// A parsed GGUF file.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    bytes: Arc<FileBytes>,
    version: u32,
    metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// The tensors' own copy, where [`Gguf::open`] made one.
    resident: Option<Arc<FileBytes>>,
}

impl Gguf {
    /// Parses a GGUF file and copies the tensors a forward pass reads whole
    /// into memory of its own ([`FileBytes::resident`]); the rest, or all
    /// where memory is short, stays mapped.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, true)
    }

    /// Maps and parses a GGUF file; the tensor data stays in the file's pages.
    pub fn open_mapped(path: &Path) -> Result<Self> {
        Self::open_as(path, false)
    }

    fn open_as(path: &Path, resident: bool) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; model files are not modified while served.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut g = Self::parse(path.to_path_buf(), FileBytes::Mapped(map))?;
        // The header is parsed into values: its pages are not read again.
        let data_start = g.tensors.iter().map(|t| t.offset).min().unwrap_or(0);
        g.bytes.release(0..data_start);
        if resident {
            // Only the tensors a forward pass reads whole: the header is
            // parsed into values already, and an embedding table apart from
            // the output matrix is read a few rows per token (on Qwen2.5 0.5B
            // a fifth of the file), so it stays in the map.
            let ranges: Vec<_> = g
                .tensors
                .iter()
                .filter(|t| !g.lookup_only(&t.name))
                .map(|t| t.offset..t.offset + t.size)
                .collect();
            g.resident = FileBytes::resident(&file, g.bytes.len(), &ranges)
                .map_err(io)?
                .map(Arc::new);
        }
        Ok(g)
    }

    /// Bytes of tensor data copied into memory of its own by [`Gguf::open`]
    /// (0 where the file stayed mapped).
    pub fn resident_bytes(&self) -> usize {
        if self.resident.is_none() {
            return 0;
        }
        self.tensors
            .iter()
            .filter(|t| !self.lookup_only(&t.name))
            .map(|t| t.size)
            .sum()
    }

    /// Whether a tensor is only ever read a row at a time: the token
    /// embedding of a file that has its own output matrix.
    fn lookup_only(&self, name: &str) -> bool {
        name == "token_embd.weight" && self.tensor_index.contains_key("output.weight")
    }

    /// Parses a GGUF image held in memory; `name` stands for the path in errors.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: FileBytes) -> Result<Self> {
        let header = Header::parse(&bytes).map_err(|message| Error::Gguf {
            path: path.clone(),
            message,
        })?;
        let index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            bytes: Arc::new(bytes),
            version: header.version,
            metadata: header.metadata,
            index,
            tensors: header.tensors,
            tensor_index,
            resident: None,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, message: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| self.meta_err(key, "missing"))
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            _ => Err(self.meta_err(key, "expected a string")),
        }
    }

    /// An integer value that fits in `u32`, whatever integer type the file used.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.require(key)?
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| self.meta_err(key, "expected an unsigned 32-bit integer"))
    }

    /// A numeric value as `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.require(key)?
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| self.meta_err(key, "expected a number"))
    }

    /// A boolean value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.meta_err(key, "expected a bool")),
        }
    }

    fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            _ => Err(self.meta_err(key, "expected an array")),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(self.meta_err(key, "expected an array of strings")),
            })
            .collect()
    }

    /// An array of numbers as `f32`.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.meta_err(key, "expected an array of numbers"))
            })
            .collect()
    }

    /// An array of integers as `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .map(|v| {
                v.as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| self.meta_err(key, "expected an array of 32-bit integers"))
            })
            .collect()
    }

    /// A tensor's info, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A tensor with its data, or an error naming it when it is missing.
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            message: "missing from the file".into(),
        })?;
        Ok(QTensor {
            name: info.name.clone(),
            ty: info.ty,
            shape: info.shape.clone(),
            data: Bytes::new(
                match &self.resident {
                    Some(copy) if !self.lookup_only(name) => copy.clone(),
                    _ => self.bytes.clone(),
                },
                info.offset..info.offset + info.size,
            ),
        })
    }
}

/// Everything before the tensor data, parsed from a byte slice.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorInfo>,
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> ParseResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: need {n} bytes at offset {}, file has {}",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> ParseResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> ParseResult<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> ParseResult<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_item_bytes`: rejected when
    /// the rest of the file could not hold that many, before anything allocates.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> ParseResult<usize> {
        let n = self.u64()?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item_bytes.max(1)))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(format!(
                "{what} count {n} at offset {} exceeds what the file can hold",
                self.pos - 8
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> ParseResult<String> {
        let len = self.count("string length", 1)?;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> ParseResult<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("invalid bool byte {b} at offset {}", self.pos - 1)),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err("arrays nested too deeply".into());
                }
                let elem_ty = self.u32()?;
                let min = min_value_bytes(elem_ty)
                    .ok_or_else(|| format!("unknown array element type {elem_ty}"))?;
                let n = self.count("array", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            _ => return Err(format!("unknown metadata value type {ty}")),
        })
    }
}

/// The fewest bytes a value of GGUF type `ty` occupies.
fn min_value_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

impl Header {
    fn parse(buf: &[u8]) -> ParseResult<Header> {
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.take(4).map_err(|_| "file too short for a GGUF header")?;
        if magic != MAGIC {
            return Err(format!("bad magic {magic:02x?}, expected \"GGUF\""));
        }
        let version = c.u32()?;
        match version {
            2 | 3 => {}
            1 => return Err("GGUF version 1 is not supported (re-convert the model)".into()),
            v if v.swap_bytes() <= 3 => {
                return Err("big-endian GGUF files are not supported".into())
            }
            v => return Err(format!("unsupported GGUF version {v}")),
        }
        // A tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes; a key-value 8 + 4 + 1.
        let n_tensors = c.count("tensor", 32)?;
        let n_kv = c.count("metadata", 13)?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut seen = HashMap::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string().map_err(|e| format!("metadata entry {i}: {e}"))?;
            let ty = c.u32()?;
            let value = c
                .value(ty, 0)
                .map_err(|e| format!("metadata key '{key}': {e}"))?;
            if seen.insert(key.clone(), ()).is_some() {
                return Err(format!("duplicate metadata key '{key}'"));
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a,
                _ => return Err(format!("general.alignment {v:?} is not a power of two")),
            },
        } as usize;

        let mut raw = Vec::with_capacity(n_tensors);
        let mut names = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string().map_err(|e| format!("tensor info {i}: {e}"))?;
            let ctx = |e: String| format!("tensor '{name}': {e}");
            let n_dims = c.u32().map_err(ctx)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(ctx(format!(
                    "{n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64().map_err(ctx)?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0 && d < (1 << 40))
                    .ok_or_else(|| ctx(format!("dimension {d} out of range")))?;
                shape.push(d);
            }
            let ty_id = c.u32().map_err(ctx)?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| ctx(format!("unsupported tensor type id {ty_id}")))?;
            let offset = c.u64().map_err(ctx)?;
            if names.insert(name.clone(), ()).is_some() {
                return Err(format!("duplicate tensor name '{name}'"));
            }
            raw.push((name, ty, shape, offset));
        }

        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, ty, shape, offset) in raw {
            let ctx = |e: String| format!("tensor '{name}': {e}");
            let elems = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| ctx("element count overflows".into()))?;
            if shape[0] % ty.block_size() != 0 {
                return Err(ctx(format!(
                    "row of {} elements is not a whole number of {ty} blocks ({})",
                    shape[0],
                    ty.block_size()
                )));
            }
            let size = (elems / ty.block_size())
                .checked_mul(ty.type_size())
                .ok_or_else(|| ctx("byte size overflows".into()))?;
            let rel = usize::try_from(offset).map_err(|_| ctx("offset too large".into()))?;
            if rel % alignment != 0 {
                return Err(ctx(format!("offset {rel} is not aligned to {alignment}")));
            }
            let start = data_start
                .checked_add(rel)
                .ok_or_else(|| ctx("offset overflows".into()))?;
            let end = start
                .checked_add(size)
                .filter(|&e| e <= buf.len())
                .ok_or_else(|| {
                    ctx(format!(
                        "data ({size} bytes at offset {start}) runs past the end of the file ({} bytes)",
                        buf.len()
                    ))
                })?;
            tensors.push(TensorInfo {
                name,
                ty,
                shape,
                offset: start,
                size: end - start,
            });
        }
        Ok(Header {
            version,
            metadata,
            tensors,
        })
    }
}

/// Builds GGUF images in memory, for tests and fuzz seeds.
pub mod writer {
    use super::Value;
    use crate::quant::GgmlType;

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(x) => out.push(*x as u8),
            Value::String(s) => put_str(out, s),
            Value::Array(items) => {
                let elem = items.first().map(type_id).unwrap_or(0);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
        }
    }

    /// A tensor to write: name, type, shape (innermost first) and raw data.
    pub struct TensorSpec {
        /// Name.
        pub name: String,
        /// Element format.
        pub ty: GgmlType,
        /// Dimensions, innermost first.
        pub shape: Vec<usize>,
        /// Raw data in `ty`'s layout.
        pub data: Vec<u8>,
    }

    /// Serializes a version-3 GGUF image with 32-byte alignment.
    pub fn write(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).div_ceil(32) * 32;
        }
        for t in tensors {
            out.resize(out.len().div_ceil(32) * 32, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::{write, TensorSpec};
    use super::*;

    fn sample() -> Vec<u8> {
        let meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            ("some.i64".to_string(), Value::I64(-5)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            (
                "tokenizer.ggml.scores".to_string(),
                Value::Array(vec![Value::F32(0.5), Value::F32(-1.0)]),
            ),
            ("flag".to_string(), Value::Bool(true)),
        ];
        let tensors = vec![
            TensorSpec {
                name: "w".into(),
                ty: GgmlType::F32,
                shape: vec![4, 2],
                data: (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect(),
            },
            TensorSpec {
                name: "q".into(),
                ty: GgmlType::Q8_0,
                shape: vec![32],
                data: vec![7u8; 34],
            },
        ];
        write(&meta, &tensors)
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = Gguf::from_bytes("mem", sample()).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get("some.i64").unwrap().as_i64(), Some(-5));
        assert!(g.get_u32("some.i64").is_err());
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["a", "b"]
        );
        assert_eq!(
            g.get_f32_array("tokenizer.ggml.scores").unwrap(),
            [0.5, -1.0]
        );
        assert!(g.get_bool("flag").unwrap());
        let w = g.tensor("w").unwrap();
        assert_eq!((w.cols(), w.rows()), (4, 2));
        assert_eq!(&w.row(1)[..4], &4.0f32.to_le_bytes());
        let q = g.tensor("q").unwrap();
        assert_eq!(q.data.len(), 34);
        assert!(q.data.iter().all(|&b| b == 7));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_file_reads_the_same_copied_or_mapped() {
        let path = std::env::temp_dir().join(format!("embody-gguf-{}.gguf", std::process::id()));
        std::fs::write(&path, sample()).unwrap();
        let (copied, mapped) = (
            Gguf::open(&path).unwrap(),
            Gguf::open_mapped(&path).unwrap(),
        );
        std::fs::remove_file(&path).unwrap();
        // A few KiB always fit: this is the copy, not the map.
        assert!(matches!(
            copied.resident.as_deref(),
            Some(FileBytes::Resident(_))
        ));
        assert!(mapped.resident.is_none());
        assert_eq!(
            copied.resident_bytes(),
            copied.tensors().iter().map(|t| t.size).sum::<usize>()
        );
        assert_eq!(mapped.resident_bytes(), 0);
        assert_eq!(copied.metadata(), mapped.metadata());
        for t in mapped.tensors() {
            let (a, b) = (
                copied.tensor(&t.name).unwrap(),
                mapped.tensor(&t.name).unwrap(),
            );
            assert_eq!(&a.data[..], &b.data[..], "tensor {}", t.name);
        }
        assert_eq!(mapped.tensors().len(), 2);
    }

    #[test]
    fn missing_key_and_tensor_are_named() {
        let g = Gguf::from_bytes("mem", sample()).unwrap();
        let e = g.get_str("llama.context_length").unwrap_err().to_string();
        assert!(
            e.contains("llama.context_length") && e.contains("missing"),
            "{e}"
        );
        let e = g.tensor("output.weight").unwrap_err().to_string();
        assert!(e.contains("output.weight"), "{e}");
    }

    fn expect_err(bytes: Vec<u8>, needle: &str) {
        let e = Gguf::from_bytes("bad.gguf", bytes).unwrap_err().to_string();
        assert!(e.contains("bad.gguf"), "{e}");
        assert!(e.contains(needle), "expected '{needle}' in: {e}");
    }

    #[test]
    fn rejects_wrong_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        expect_err(b, "bad magic");
        let mut b = sample();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        expect_err(b, "version 1");
        let mut b = sample();
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        expect_err(b, "big-endian");
    }

    #[test]
    fn rejects_every_truncation_without_panicking() {
        let b = sample();
        // Every prefix shorter than the header plus data must fail cleanly.
        for len in 0..b.len() {
            assert!(
                Gguf::from_bytes("bad.gguf", b[..len].to_vec()).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn rejects_absurd_counts() {
        let mut b = sample();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_err(b, "tensor count");
        let mut b = sample();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        expect_err(b, "metadata count");
    }

    #[test]
    fn rejects_tensor_past_end_and_unknown_type() {
        let b = sample();
        let g = Gguf::from_bytes("mem", b.clone()).unwrap();
        // Locate the last tensor info's offset field: the last 8 bytes before data alignment.
        let info_name = b"q";
        let pos = b
            .windows(9)
            .rposition(|w| w[..8] == 1u64.to_le_bytes() && &w[8..] == info_name)
            .unwrap();
        let off_pos = pos + 9 + 4 + 8 + 4;
        let mut bad = b.clone();
        bad[off_pos..off_pos + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        expect_err(bad, "tensor 'q': data");
        let mut bad = b.clone();
        bad[off_pos - 4..off_pos].copy_from_slice(&99u32.to_le_bytes());
        expect_err(bad, "tensor 'q': unsupported tensor type id 99");
        let mut bad = b;
        bad[off_pos..off_pos + 8].copy_from_slice(&3u64.to_le_bytes());
        expect_err(bad, "not aligned");
        assert_eq!(g.tensors().len(), 2);
    }
}
