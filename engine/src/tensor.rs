//! Weight storage: bytes that live in a memory-mapped model file or in memory,
//! shared cheaply between the loader and the model.
//!
//! Decode reads every weight once per token, so how the weights sit in
//! memory matters: a file map has 4 KiB pages (a TLB miss every 4 KiB of a
//! matrix, and the hardware prefetcher stops at each page's end), and the
//! kernel may drop its pages under pressure and fault them back in the
//! middle of a token. [`FileBytes::resident`] copies the tensor data into
//! anonymous memory advised for 2 MiB pages instead.

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
    /// Some of the file's byte ranges copied into anonymous memory (huge
    /// pages where the kernel gives them); other bytes read as zero.
    Resident(memmap2::MmapMut),
}

impl FileBytes {
    /// The byte ranges `ranges` of `file` (`len` bytes long) copied into
    /// anonymous memory advised for huge pages, at their offsets in the
    /// file; other bytes read as zero and take no memory. `None` where memory
    /// is short (the copy would not leave half of what is available) or the
    /// platform has no such advice: the file is better mapped.
    pub fn resident(
        file: &std::fs::File,
        len: usize,
        ranges: &[Range<usize>],
    ) -> std::io::Result<Option<Self>> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::FileExt;
            let need: usize = ranges.iter().map(|r| r.len()).sum();
            if available_memory().is_none_or(|avail| need > avail / 2) {
                return Ok(None);
            }
            let mut m = memmap2::MmapMut::map_anon(len.max(1))?;
            // Advice only: without transparent huge pages the copy still
            // keeps the weights resident.
            let _ = m.advise(memmap2::Advice::HugePage);
            for r in ranges {
                file.read_exact_at(&mut m[r.clone()], r.start as u64)?;
            }
            Ok(Some(FileBytes::Resident(m)))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (file, len, ranges);
            Ok(None)
        }
    }

    /// Gives back the memory of a map's pages in `range` (read once, not
    /// needed again); a later read faults them back in from the file.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        if let FileBytes::Mapped(m) = self {
            let end = range.end.min(m.len());
            if range.start < end {
                // SAFETY: a read-only map of a file: dropped pages read the
                // same bytes back from the file.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        range.start,
                        end - range.start,
                    )
                };
            }
        }
    }
}

/// Bytes of this process's anonymous memory in huge pages
/// (`AnonHugePages` of /proc/self/smaps_rollup), where the platform says.
pub fn huge_page_bytes() -> Option<u64> {
    proc_kib("/proc/self/smaps_rollup", "AnonHugePages:").map(|b| b as u64)
}

/// `MemAvailable` of /proc/meminfo in bytes.
#[cfg(target_os = "linux")]
fn available_memory() -> Option<usize> {
    proc_kib("/proc/meminfo", "MemAvailable:")
}

/// The `key  N kB` line of a /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<usize> {
    let info = std::fs::read_to_string(path).ok()?;
    let line = info.lines().find(|l| l.starts_with(key))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
            FileBytes::Resident(m) => m,
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

    /// The sub-range `r` of this view (offsets relative to it).
    ///
    /// # Panics
    /// If `r` lies outside the view.
    pub fn slice(&self, r: Range<usize>) -> Self {
        assert!(
            r.start <= r.end && r.end <= self.range.len(),
            "Bytes::slice"
        );
        Self::new(
            self.file.clone(),
            self.range.start + r.start..self.range.start + r.end,
        )
    }
}

impl Bytes {
    /// Gives back the memory of the view's mapped pages (their bytes were
    /// copied elsewhere, to a GPU); a later read faults them back in.
    pub fn release(&self) {
        self.file.release(self.range.clone());
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

    /// Rows `r` of a matrix as a matrix of their own, sharing the bytes (one
    /// of the Q, K and V parts of a fused projection).
    ///
    /// # Panics
    /// If the tensor is not a matrix or `r` passes its rows.
    pub fn row_range(&self, r: Range<usize>) -> QTensor {
        assert!(self.shape.len() == 2 && r.end <= self.rows(), "row_range");
        let rb = self.row_bytes();
        QTensor {
            name: format!("{}[{}..{}]", self.name, r.start, r.end),
            ty: self.ty,
            shape: vec![self.cols(), r.len()],
            data: self.data.slice(r.start * rb..r.end * rb),
        }
    }
}
