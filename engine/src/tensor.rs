//! Weight storage: bytes that live in a memory-mapped model file or in memory,
//! shared cheaply between the loader and the model.

use std::ops::{Deref, Range};
use std::sync::Arc;

use crate::quant::GgmlType;

/// Bytes backing a whole model file: a read-only memory map or an owned buffer.
#[derive(Debug)]
pub enum FileBytes {
    /// A read-only map of the file.
    Mapped(memmap2::Mmap),
    /// The file's bytes held in memory (tests, fuzzing, converted weights).
    Owned(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

/// A range of bytes inside a shared file buffer.
#[derive(Clone, Debug)]
pub struct Bytes {
    file: Arc<FileBytes>,
    range: Range<usize>,
}

impl Bytes {
    /// A view of `range` inside `file`.
    ///
    /// # Panics
    /// If the range lies outside the buffer; callers check bounds when parsing.
    pub fn new(file: Arc<FileBytes>, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= file.len());
        Self { file, range }
    }

    /// Wraps an owned buffer.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self::new(Arc::new(FileBytes::Owned(v)), 0..len)
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.file[self.range.clone()]
    }
}

/// A weight tensor in its stored format. `shape` lists dimensions innermost
/// first, as GGUF does: a matrix of `rows` rows of `cols` elements is
/// `[cols, rows]`.
#[derive(Clone, Debug)]
pub struct QTensor {
    /// The tensor's name in the file.
    pub name: String,
    /// Element format.
    pub ty: GgmlType,
    /// Dimensions, innermost first.
    pub shape: Vec<usize>,
    /// Raw data, `ty.row_bytes(shape[0]) * rows` bytes.
    pub data: Bytes,
}

impl QTensor {
    /// Elements per row (the innermost dimension).
    pub fn cols(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows (the product of the outer dimensions).
    pub fn rows(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows().max(1)
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}
