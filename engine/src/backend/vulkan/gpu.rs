//! The Vulkan device: instance, queue, memory and pipelines, and the one
//! command buffer that every operation records into until the host needs a
//! result ([`Gpu::flush`]): a decode step is one submission and one fence
//! wait, at the logits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ash::vk;

use crate::{Error, Result};

mod spirv {
    include!(concat!(env!("OUT_DIR"), "/spirv.rs"));
}

/// Storage-buffer bindings of the one descriptor set every kernel uses.
const BINDINGS: u32 = 7;
/// Bytes of push constants a kernel may take.
const PUSH_BYTES: u32 = 64;
/// Host-visible memory for the small per-call data shaders read (token
/// ids, block tables) and for staging writes; larger pieces get their own.
const ARENA_CHUNK: u64 = 8 << 20;

/// A buffer and its memory. Mapped (`ptr` non-null) when host-visible.
pub(crate) struct Raw {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    size: u64,
    ptr: *mut u8,
}

// SAFETY: the mapping is written only under the recorder's lock, and the
// handles are plain Vulkan handles, usable from any thread.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

/// A buffer the kernels read and write; its memory is given back when the
/// commands that may use it have run.
pub(crate) struct GpuBuf {
    gpu: Arc<Gpu>,
    raw: Option<Raw>,
}

impl GpuBuf {
    /// The whole buffer, as a binding.
    pub(crate) fn bind(&self) -> Binding {
        let raw = self.raw();
        Binding {
            buffer: raw.buffer,
            offset: 0,
            range: raw.size,
        }
    }

    /// Bytes held.
    pub(crate) fn size(&self) -> u64 {
        self.raw().size
    }

    fn raw(&self) -> &Raw {
        self.raw.as_ref().expect("a live buffer")
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.gpu.release(raw);
        }
    }
}

/// What a kernel's binding holds: a range of a buffer, or values from the
/// host (token ids, block tables) to stage for it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Bind<'a> {
    Buf(Binding),
    Data(&'a [u32]),
}

impl From<Binding> for Bind<'_> {
    fn from(b: Binding) -> Self {
        Bind::Buf(b)
    }
}

/// A range of a buffer given to a kernel.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Binding {
    buffer: vk::Buffer,
    offset: u64,
    range: u64,
}

/// What is recorded and not yet run, and the memory it uses.
struct Recorder {
    pool: vk::CommandPool,
    cb: vk::CommandBuffer,
    fence: vk::Fence,
    /// Commands recorded since the last submission.
    pending: usize,
    /// Host-visible chunks, and where the next piece goes: (chunk, offset).
    arena: Vec<Raw>,
    at: (usize, u64),
    /// Memory to free once the pending commands have run.
    retired: Vec<Raw>,
    /// Where results are copied for the host.
    readback: Option<Raw>,
}

/// One Vulkan device and queue, shared by every handle the backend made.
pub(crate) struct Gpu {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    push: ash::khr::push_descriptor::Device,
    queue: vk::Queue,
    /// The device's name as its driver reports it.
    pub(crate) name: String,
    memory: vk::PhysicalDeviceMemoryProperties,
    /// The largest range one storage-buffer binding may cover.
    pub(crate) max_range: u64,
    align: u64,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipelines: Mutex<HashMap<&'static str, vk::Pipeline>>,
    rec: Mutex<Recorder>,
    /// A submission failed: nothing more is recorded or run here.
    lost: AtomicBool,
    /// Results read back so far, and the read at which a test has this
    /// device act lost (`EMBODY_TEST_VULKAN_LOSE_AT_READ`).
    reads: AtomicU64,
    lose_at: Option<u64>,
}

/// Whether the test hook has made a device act lost in this process: it
/// strikes once, so the device opened again after it works.
static TEST_LOSS_DONE: AtomicBool = AtomicBool::new(false);

fn vk_err(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::Device(format!("{what}: {e}"))
}

/// The physical devices, with their names.
fn devices(instance: &ash::Instance) -> Result<Vec<(vk::PhysicalDevice, String)>> {
    // SAFETY: a live instance.
    let pds = unsafe { instance.enumerate_physical_devices() }
        .map_err(vk_err("listing Vulkan devices"))?;
    Ok(pds
        .into_iter()
        .map(|pd| {
            // SAFETY: a device of this instance.
            let props = unsafe { instance.get_physical_device_properties(pd) };
            let name = props
                .device_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            (pd, name)
        })
        .collect())
}

impl Gpu {
    /// Opens the device `selector` names (an index, or part of its name,
    /// case-insensitive); without one, the first GPU (discrete before
    /// integrated), else the first device of any kind.
    pub(crate) fn open(selector: Option<&str>) -> Result<Arc<Self>> {
        // SAFETY: loading the system's Vulkan loader, which is trusted as
        // the dynamic linker trusts it.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| {
            Error::Device(format!(
                "the Vulkan loader (libvulkan.so.1) could not be loaded: {e}; install it \
                 and a Vulkan driver (Debian: libvulkan1 and mesa-vulkan-drivers)"
            ))
        })?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"embodyd")
            .api_version(vk::API_VERSION_1_2);
        // SAFETY: valid create info.
        let instance = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )
        }
        .map_err(vk_err("creating a Vulkan instance"))?;
        match Self::with_instance(entry, instance.clone(), selector) {
            Ok(gpu) => Ok(gpu),
            Err(e) => {
                // SAFETY: nothing made from the instance survives.
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    fn with_instance(
        entry: ash::Entry,
        instance: ash::Instance,
        selector: Option<&str>,
    ) -> Result<Arc<Self>> {
        let all = devices(&instance)?;
        let names = || {
            all.iter()
                .enumerate()
                .map(|(i, (_, n))| format!("{i}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if all.is_empty() {
            return Err(Error::Device(
                "no Vulkan device found: install a Vulkan driver for the GPU \
                 (or mesa-vulkan-drivers for lavapipe, on the CPU)"
                    .into(),
            ));
        }
        let rank = |pd: vk::PhysicalDevice| {
            // SAFETY: a device of this instance.
            match unsafe { instance.get_physical_device_properties(pd) }.device_type {
                vk::PhysicalDeviceType::DISCRETE_GPU => 0,
                vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
                vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
                _ => 3,
            }
        };
        let (pd, name) = match selector.map(str::trim).filter(|s| !s.is_empty()) {
            None => all.iter().min_by_key(|(pd, _)| rank(*pd)).cloned(),
            Some(s) => match s.parse::<usize>() {
                Ok(i) => all.get(i).cloned(),
                Err(_) => {
                    let s = s.to_lowercase();
                    all.iter()
                        .find(|(_, n)| n.to_lowercase().contains(&s))
                        .cloned()
                }
            },
        }
        .ok_or_else(|| {
            Error::Device(format!(
                "no Vulkan device matches '{}' (devices: {})",
                selector.unwrap_or(""),
                names()
            ))
        })?;

        // SAFETY: queries on a device of this instance.
        let (props, memory, families, exts) = unsafe {
            (
                instance.get_physical_device_properties(pd),
                instance.get_physical_device_memory_properties(pd),
                instance.get_physical_device_queue_family_properties(pd),
                instance
                    .enumerate_device_extension_properties(pd)
                    .map_err(vk_err("listing device extensions"))?,
            )
        };
        let has_push = exts.iter().any(|e| {
            e.extension_name_as_c_str()
                .is_ok_and(|n| n == ash::khr::push_descriptor::NAME)
        });
        if !has_push {
            return Err(Error::Device(format!(
                "the Vulkan device '{name}' lacks VK_KHR_push_descriptor, which the backend needs"
            )));
        }
        let family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| {
                Error::Device(format!("the Vulkan device '{name}' has no compute queue"))
            })? as u32;
        let priorities = [1.0];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let ext_names = [ash::khr::push_descriptor::NAME.as_ptr()];
        // SAFETY: valid create info for a device of this instance.
        let device = unsafe {
            instance.create_device(
                pd,
                &vk::DeviceCreateInfo::default()
                    .queue_create_infos(&queues)
                    .enabled_extension_names(&ext_names),
                None,
            )
        }
        .map_err(vk_err("creating the Vulkan device"))?;
        let push = ash::khr::push_descriptor::Device::new(&instance, &device);
        // SAFETY: the queue the device was created with.
        let queue = unsafe { device.get_device_queue(family, 0) };

        let bindings: Vec<_> = (0..BINDINGS)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // SAFETY: valid create infos on a live device.
        let (set_layout, pool, fence) = unsafe {
            (
                device
                    .create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default()
                            .flags(vk::DescriptorSetLayoutCreateFlags::PUSH_DESCRIPTOR_KHR)
                            .bindings(&bindings),
                        None,
                    )
                    .map_err(vk_err("creating the descriptor layout"))?,
                device
                    .create_command_pool(
                        &vk::CommandPoolCreateInfo::default().queue_family_index(family),
                        None,
                    )
                    .map_err(vk_err("creating the command pool"))?,
                device
                    .create_fence(&vk::FenceCreateInfo::default(), None)
                    .map_err(vk_err("creating a fence"))?,
            )
        };
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::COMPUTE)
            .size(PUSH_BYTES)];
        let set_layouts = [set_layout];
        // SAFETY: as above.
        let (layout, cb) = unsafe {
            (
                device
                    .create_pipeline_layout(
                        &vk::PipelineLayoutCreateInfo::default()
                            .set_layouts(&set_layouts)
                            .push_constant_ranges(&ranges),
                        None,
                    )
                    .map_err(vk_err("creating the pipeline layout"))?,
                device
                    .allocate_command_buffers(
                        &vk::CommandBufferAllocateInfo::default()
                            .command_pool(pool)
                            .command_buffer_count(1),
                    )
                    .map_err(vk_err("allocating a command buffer"))?[0],
            )
        };
        let limits = props.limits;
        let gpu = Arc::new(Self {
            _entry: entry,
            instance,
            device,
            push,
            queue,
            name,
            memory,
            max_range: u64::from(limits.max_storage_buffer_range),
            align: limits.min_storage_buffer_offset_alignment.max(16),
            set_layout,
            layout,
            pipelines: Mutex::new(HashMap::new()),
            lost: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            lose_at: std::env::var("EMBODY_TEST_VULKAN_LOSE_AT_READ")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|_| !TEST_LOSS_DONE.load(Ordering::SeqCst)),
            rec: Mutex::new(Recorder {
                pool,
                cb,
                fence,
                pending: 0,
                arena: Vec::new(),
                at: (0, 0),
                retired: Vec::new(),
                readback: None,
            }),
        });
        gpu.begin(&mut gpu.lock());
        Ok(gpu)
    }

    fn lock(&self) -> MutexGuard<'_, Recorder> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a submission has failed.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// The recorder, for recording: a lost device takes no more commands
    /// (its command buffer is in no state to record into).
    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        if self.is_lost() {
            panic!("the Vulkan device '{}' was lost", self.name);
        }
        self.lock()
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        self.lost.store(true, Ordering::SeqCst);
        panic!("the Vulkan device '{}' failed: {what}", self.name);
    }

    fn begin(&self, rec: &mut Recorder) {
        // SAFETY: the command buffer is not in use (fresh or reset).
        unsafe {
            self.device
                .begin_command_buffer(
                    rec.cb,
                    &vk::CommandBufferBeginInfo::default()
                        .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )
                .expect("beginning a Vulkan command buffer");
        }
    }

    /// A memory type with `want`, among those `bits` allows.
    fn memory_type(&self, bits: u32, want: vk::MemoryPropertyFlags) -> Option<u32> {
        (0..self.memory.memory_type_count).find(|&i| {
            bits & (1 << i) != 0
                && self.memory.memory_types[i as usize]
                    .property_flags
                    .contains(want)
        })
    }

    fn raw(&self, size: u64, host: bool) -> Result<Raw> {
        let size = size.max(4).next_multiple_of(4);
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        // SAFETY: valid create info; the buffer is destroyed on failure.
        unsafe {
            let buffer = self
                .device
                .create_buffer(
                    &vk::BufferCreateInfo::default().size(size).usage(usage),
                    None,
                )
                .map_err(vk_err("creating a buffer"))?;
            let req = self.device.get_buffer_memory_requirements(buffer);
            let (want, fallback) = if host {
                let f =
                    vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
                (f, f)
            } else {
                (
                    vk::MemoryPropertyFlags::DEVICE_LOCAL,
                    vk::MemoryPropertyFlags::empty(),
                )
            };
            let Some(ty) = self
                .memory_type(req.memory_type_bits, want)
                .or_else(|| self.memory_type(req.memory_type_bits, fallback))
            else {
                self.device.destroy_buffer(buffer, None);
                return Err(Error::Device("no suitable Vulkan memory type".into()));
            };
            let memory = match self.device.allocate_memory(
                &vk::MemoryAllocateInfo::default()
                    .allocation_size(req.size)
                    .memory_type_index(ty),
                None,
            ) {
                Ok(m) => m,
                Err(e) => {
                    self.device.destroy_buffer(buffer, None);
                    return Err(Error::Device(format!(
                        "out of GPU memory: {} MiB more could not be allocated ({e}) on '{}'",
                        size.div_ceil(1 << 20),
                        self.name
                    )));
                }
            };
            let bound = self.device.bind_buffer_memory(buffer, memory, 0);
            let ptr = if host && bound.is_ok() {
                self.device
                    .map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map(|p| p.cast::<u8>())
            } else {
                Ok(std::ptr::null_mut())
            };
            match bound.and(ptr) {
                Ok(ptr) => Ok(Raw {
                    buffer,
                    memory,
                    size,
                    ptr,
                }),
                Err(e) => {
                    self.device.destroy_buffer(buffer, None);
                    self.device.free_memory(memory, None);
                    Err(Error::Device(format!("binding GPU memory: {e}")))
                }
            }
        }
    }

    fn destroy(&self, raw: Raw) {
        // SAFETY: no pending command uses the buffer (see `release`).
        unsafe {
            self.device.destroy_buffer(raw.buffer, None);
            self.device.free_memory(raw.memory, None);
        }
    }

    fn release(&self, raw: Raw) {
        let mut rec = self.lock();
        if rec.pending > 0 {
            rec.retired.push(raw);
        } else {
            drop(rec);
            self.destroy(raw);
        }
    }

    /// A device buffer of `bytes` zeros.
    pub(crate) fn buffer(self: &Arc<Self>, bytes: u64) -> Result<GpuBuf> {
        if bytes > self.max_range {
            return Err(Error::Device(format!(
                "a buffer of {} MiB exceeds the largest storage buffer of '{}' ({} MiB)",
                bytes.div_ceil(1 << 20),
                self.name,
                self.max_range >> 20
            )));
        }
        let raw = self.raw(bytes, false)?;
        let mut rec = self.recorder();
        // SAFETY: recording into the recorder's command buffer under its lock.
        unsafe {
            self.device
                .cmd_fill_buffer(rec.cb, raw.buffer, 0, vk::WHOLE_SIZE, 0);
        }
        self.barrier(&mut rec);
        Ok(GpuBuf {
            gpu: self.clone(),
            raw: Some(raw),
        })
    }

    /// Room for `bytes` in host-visible memory that lives until the next
    /// submission has run: (buffer, offset, mapping).
    fn stage(&self, rec: &mut Recorder, bytes: u64) -> Result<(vk::Buffer, u64, *mut u8)> {
        let bytes = bytes.max(4);
        if bytes > ARENA_CHUNK {
            let raw = self.raw(bytes, true)?;
            let out = (raw.buffer, 0, raw.ptr);
            rec.retired.push(raw);
            return Ok(out);
        }
        let (mut chunk, mut at) = rec.at;
        at = at.next_multiple_of(self.align);
        if chunk < rec.arena.len() && at + bytes > ARENA_CHUNK {
            (chunk, at) = (chunk + 1, 0);
        }
        if chunk == rec.arena.len() {
            rec.arena.push(self.raw(ARENA_CHUNK, true)?);
        }
        let raw = &rec.arena[chunk];
        rec.at = (chunk, at + bytes);
        // SAFETY: `at + bytes` is within the mapped chunk.
        Ok((raw.buffer, at, unsafe { raw.ptr.add(at as usize) }))
    }

    /// Copies `data` into `dst` from byte `at`, in order with the recorded kernels.
    pub(crate) fn upload(&self, dst: &GpuBuf, at: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut rec = self.recorder();
        let (src, offset, ptr) = self.stage(&mut rec, data.len() as u64)?;
        // SAFETY: `ptr` has room for the data; the copy is recorded under the lock.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len());
            let region = vk::BufferCopy::default()
                .src_offset(offset)
                .dst_offset(at)
                .size(data.len() as u64);
            self.device
                .cmd_copy_buffer(rec.cb, src, dst.raw().buffer, &[region]);
        }
        self.barrier(&mut rec);
        Ok(())
    }

    /// `bytes` bytes from `src` at `from` into `dst` at `to`, in order.
    pub(crate) fn copy(&self, src: &GpuBuf, from: u64, dst: &GpuBuf, to: u64, bytes: u64) {
        self.copy_raw(src.raw().buffer, from, dst.raw().buffer, to, bytes);
    }

    fn copy_raw(&self, src: vk::Buffer, from: u64, dst: vk::Buffer, to: u64, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut rec = self.recorder();
        let region = vk::BufferCopy::default()
            .src_offset(from)
            .dst_offset(to)
            .size(bytes);
        // SAFETY: recording under the lock; the caller keeps both ranges in bounds.
        unsafe { self.device.cmd_copy_buffer(rec.cb, src, dst, &[region]) };
        self.barrier(&mut rec);
    }

    /// Reads `out.len()` bytes of `src` from byte `at`: runs everything
    /// recorded so far.
    pub(crate) fn download(&self, src: &GpuBuf, at: u64, out: &mut [u8]) {
        if out.is_empty() {
            return;
        }
        let mut rec = self.recorder();
        let bytes = out.len() as u64;
        if rec.readback.as_ref().is_none_or(|r| r.size < bytes) {
            if let Some(old) = rec.readback.take() {
                rec.retired.push(old);
            }
            let size = bytes.next_power_of_two().max(1 << 16);
            rec.readback = Some(
                self.raw(size, true)
                    .expect("host-visible memory for results"),
            );
        }
        let rb = rec.readback.as_ref().expect("a readback buffer");
        let (rb_buffer, rb_ptr) = (rb.buffer, rb.ptr);
        let region = vk::BufferCopy::default().src_offset(at).size(bytes);
        // SAFETY: recording under the lock, ranges in bounds.
        unsafe {
            self.device
                .cmd_copy_buffer(rec.cb, src.raw().buffer, rb_buffer, &[region]);
            let host = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(vk::AccessFlags::HOST_READ);
            self.device.cmd_pipeline_barrier(
                rec.cb,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[host],
                &[],
                &[],
            );
        }
        rec.pending += 1;
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        if self.lose_at == Some(n) && !TEST_LOSS_DONE.swap(true, Ordering::SeqCst) {
            self.fail("VK_ERROR_DEVICE_LOST (EMBODY_TEST_VULKAN_LOSE_AT_READ)");
        }
        self.submit(&mut rec);
        // SAFETY: the copy has completed (the fence was waited for), and the
        // memory is coherent.
        unsafe { std::ptr::copy_nonoverlapping(rb_ptr, out.as_mut_ptr(), out.len()) };
    }

    /// Runs everything recorded so far and waits for it.
    pub(crate) fn flush(&self) {
        let mut rec = self.recorder();
        self.submit(&mut rec);
    }

    fn submit(&self, rec: &mut Recorder) {
        if rec.pending == 0 {
            return;
        }
        let cbs = [rec.cb];
        // SAFETY: the command buffer is recording and owned by the lock
        // holder; the fence is unsignalled.
        unsafe {
            self.device
                .end_command_buffer(rec.cb)
                .expect("ending a Vulkan command buffer");
            let r = self
                .device
                .queue_submit(
                    self.queue,
                    &[vk::SubmitInfo::default().command_buffers(&cbs)],
                    rec.fence,
                )
                .and_then(|()| self.device.wait_for_fences(&[rec.fence], true, u64::MAX));
            if let Err(e) = r {
                // Nothing recorded can be trusted after a lost device: the
                // decoder's thread ends, and its requests with it; the
                // device is opened again for the next decoder.
                self.fail(e);
            }
            self.device
                .reset_fences(&[rec.fence])
                .expect("resetting a fence");
            self.device
                .reset_command_pool(rec.pool, vk::CommandPoolResetFlags::empty())
                .expect("resetting the command pool");
        }
        rec.pending = 0;
        rec.at = (0, 0);
        for raw in std::mem::take(&mut rec.retired) {
            self.destroy(raw);
        }
        self.begin(rec);
    }

    /// Every write so far is seen by every later read, kernel or copy.
    fn barrier(&self, rec: &mut Recorder) {
        let all = vk::AccessFlags::SHADER_READ
            | vk::AccessFlags::SHADER_WRITE
            | vk::AccessFlags::TRANSFER_READ
            | vk::AccessFlags::TRANSFER_WRITE;
        let stages = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        let b = vk::MemoryBarrier::default()
            .src_access_mask(all)
            .dst_access_mask(all);
        // SAFETY: recording under the lock.
        unsafe {
            self.device.cmd_pipeline_barrier(
                rec.cb,
                stages,
                stages,
                vk::DependencyFlags::empty(),
                &[b],
                &[],
                &[],
            );
        }
        rec.pending += 1;
    }

    fn pipeline(&self, name: &'static str) -> vk::Pipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&p) = cache.get(name) {
            return p;
        }
        let &(_, entry, bytes) = spirv::SPIRV
            .iter()
            .find(|(n, ..)| *n == name)
            .unwrap_or_else(|| panic!("no kernel named {name}"));
        let code = ash::util::read_spv(&mut std::io::Cursor::new(bytes)).expect("SPIR-V words");
        // SAFETY: SPIR-V made by the build from the repository's shaders,
        // checked by naga's validator.
        let p = unsafe {
            let module = self
                .device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&code), None)
                .expect("creating a shader module");
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(entry);
            let p = self
                .device
                .create_compute_pipelines(
                    vk::PipelineCache::null(),
                    &[vk::ComputePipelineCreateInfo::default()
                        .stage(stage)
                        .layout(self.layout)],
                    None,
                )
                .map_err(|(_, e)| e)
                .expect("creating a compute pipeline")[0];
            self.device.destroy_shader_module(module, None);
            p
        };
        cache.insert(name, p);
        p
    }

    /// Records kernel `name` over `groups` workgroups, binding `bindings`
    /// in order (0, 1, …) and pushing `params`. Host data among the
    /// bindings is staged under the same lock as the recording, so no
    /// submission by another thread reuses its memory in between.
    pub(crate) fn dispatch(
        &self,
        name: &'static str,
        bindings: &[Bind<'_>],
        params: &[u32],
        groups: [u32; 3],
    ) {
        if groups.contains(&0) {
            return;
        }
        let bytes: Vec<u8> = params.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(
            bytes.len() <= PUSH_BYTES as usize,
            "{name}: too many parameters"
        );
        let pipeline = self.pipeline(name);
        let mut rec = self.recorder();
        let mut infos: Vec<[vk::DescriptorBufferInfo; 1]> = Vec::with_capacity(bindings.len());
        for b in bindings {
            let b = match *b {
                Bind::Buf(b) => b,
                Bind::Data(data) => {
                    let len = std::mem::size_of_val(data) as u64;
                    let (buffer, offset, ptr) = self
                        .stage(&mut rec, len)
                        .expect("host-visible memory for a kernel's data");
                    // SAFETY: `ptr` has room for `len` bytes; the kernel
                    // reads them when the submission runs.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data.as_ptr().cast::<u8>(), ptr, len as usize)
                    };
                    Binding {
                        buffer,
                        offset,
                        range: len.max(4),
                    }
                }
            };
            infos.push([vk::DescriptorBufferInfo::default()
                .buffer(b.buffer)
                .offset(b.offset)
                .range(b.range.min(self.max_range))]);
        }
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        // SAFETY: recording under the lock with live buffers and a pipeline
        // of this device's layout.
        unsafe {
            self.device
                .cmd_bind_pipeline(rec.cb, vk::PipelineBindPoint::COMPUTE, pipeline);
            self.push.cmd_push_descriptor_set(
                rec.cb,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &writes,
            );
            if !bytes.is_empty() {
                self.device.cmd_push_constants(
                    rec.cb,
                    self.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    &bytes,
                );
            }
            self.device
                .cmd_dispatch(rec.cb, groups[0], groups[1], groups[2]);
        }
        self.barrier(&mut rec);
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: the last handle is gone; the device is idle after the
        // wait, so everything it made can be destroyed.
        unsafe {
            let _ = self.device.device_wait_idle();
            let rec = self.rec.get_mut().unwrap_or_else(|e| e.into_inner());
            let raws: Vec<Raw> = rec
                .arena
                .drain(..)
                .chain(rec.retired.drain(..))
                .chain(rec.readback.take())
                .collect();
            let (pool, fence) = (rec.pool, rec.fence);
            for raw in raws {
                self.device.destroy_buffer(raw.buffer, None);
                self.device.free_memory(raw.memory, None);
            }
            for (_, p) in self
                .pipelines
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
            {
                self.device.destroy_pipeline(p, None);
            }
            self.device.destroy_pipeline_layout(self.layout, None);
            self.device
                .destroy_descriptor_set_layout(self.set_layout, None);
            self.device.destroy_command_pool(pool, None);
            self.device.destroy_fence(fence, None);
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}
