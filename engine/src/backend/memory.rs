//! Memory a backend owns: buffers of activations and weights.
//!
//! A model holds these handles and hands them to the backend's operations;
//! it never sees their contents. Host backends (CPU, reference) keep the
//! values in ordinary memory and read them through accessors visible only
//! inside `backend`; a device backend keeps its own allocation behind the
//! handle and finds it again with [`Buf::device`] / [`Weight::device`].

use std::any::Any;
use std::sync::Arc;

use crate::quant::GgmlType;
use crate::tensor::QTensor;

/// `len` f32 values in a backend's memory: activations, norm weights,
/// biases, rotary angles.
pub struct Buf {
    len: usize,
    mem: Mem,
}

enum Mem {
    Host(Vec<f32>),
    Device(Box<dyn Any + Send + Sync>),
}

impl Buf {
    /// A buffer in host memory.
    pub fn host(values: Vec<f32>) -> Self {
        Self {
            len: values.len(),
            mem: Mem::Host(values),
        }
    }

    /// A buffer of `len` values in a device backend's own allocation.
    pub fn on_device(len: usize, mem: Box<dyn Any + Send + Sync>) -> Self {
        Self {
            len,
            mem: Mem::Device(mem),
        }
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A device backend's allocation, where it is of type `T`.
    pub fn device<T: Any>(&self) -> Option<&T> {
        match &self.mem {
            Mem::Device(d) => d.downcast_ref(),
            Mem::Host(_) => None,
        }
    }

    /// A device backend's allocation, mutably, where it is of type `T`.
    pub fn device_mut<T: Any>(&mut self) -> Option<&mut T> {
        match &mut self.mem {
            Mem::Device(d) => d.downcast_mut(),
            Mem::Host(_) => None,
        }
    }

    /// The values of a host buffer.
    ///
    /// # Panics
    /// If the buffer is a device's: a handle given to a backend that did
    /// not make it.
    pub(in crate::backend) fn values(&self) -> &[f32] {
        match &self.mem {
            Mem::Host(v) => v,
            Mem::Device(_) => panic!("a device buffer given to a host backend"),
        }
    }

    /// [`Buf::values`], mutably.
    pub(in crate::backend) fn values_mut(&mut self) -> &mut [f32] {
        match &mut self.mem {
            Mem::Host(v) => v,
            Mem::Device(_) => panic!("a device buffer given to a host backend"),
        }
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self.mem {
            Mem::Host(_) => "host",
            Mem::Device(_) => "device",
        };
        write!(f, "Buf({} values, {place})", self.len)
    }
}

/// A weight matrix in a backend's memory, uploaded once at load: `rows`
/// rows of `cols` values in a GGUF type. Clones share the memory (an
/// output head tied to the token embeddings).
#[derive(Clone)]
pub struct Weight {
    name: Arc<str>,
    rows: usize,
    cols: usize,
    ty: GgmlType,
    mem: WeightMem,
}

#[derive(Clone)]
enum WeightMem {
    Host(QTensor),
    Device(Arc<dyn Any + Send + Sync>),
}

impl Weight {
    /// A weight that stays where the loader put it (host memory or the
    /// mapped file).
    pub fn host(t: QTensor) -> Self {
        Self {
            name: t.name.as_str().into(),
            rows: t.rows(),
            cols: t.cols(),
            ty: t.ty,
            mem: WeightMem::Host(t),
        }
    }

    /// A weight with `t`'s name and shape in a device backend's allocation.
    pub fn on_device(t: &QTensor, mem: Arc<dyn Any + Send + Sync>) -> Self {
        Self {
            name: t.name.as_str().into(),
            rows: t.rows(),
            cols: t.cols(),
            ty: t.ty,
            mem: WeightMem::Device(mem),
        }
    }

    /// The tensor's name in its file (for errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (the input width).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// A device backend's allocation, where it is of type `T`.
    pub fn device<T: Any>(&self) -> Option<&T> {
        match &self.mem {
            WeightMem::Device(d) => d.downcast_ref(),
            WeightMem::Host(_) => None,
        }
    }

    /// The tensor of a host weight.
    ///
    /// # Panics
    /// If the weight is a device's.
    pub(in crate::backend) fn tensor(&self) -> &QTensor {
        match &self.mem {
            WeightMem::Host(t) => t,
            WeightMem::Device(_) => panic!("a device weight given to a host backend"),
        }
    }
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weight({}, {:?} {}x{})",
            self.name, self.ty, self.rows, self.cols
        )
    }
}

/// A backend's scratch for one model's forward passes, sized at load: what
/// is inside is the backend's own.
pub struct Workspace(Box<dyn Any + Send>);

impl Workspace {
    /// Wraps a backend's scratch.
    pub fn new<T: Any + Send>(inner: T) -> Self {
        Self(Box::new(inner))
    }

    /// The backend's scratch, where it is of type `T`.
    pub fn get_mut<T: Any>(&mut self) -> Option<&mut T> {
        self.0.downcast_mut()
    }
}
