//! Compiles the Vulkan backend's WGSL shaders (`shaders/`) to SPIR-V with
//! naga when the `vulkan` feature is on: one module per kernel, and per
//! GGUF type for the kernels that read quantized weights. The list of
//! modules goes to `$OUT_DIR/spirv.rs` for `include_bytes!`.

fn main() {
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "vulkan")]
    shaders::build();
}

#[cfg(feature = "vulkan")]
mod shaders {
    use std::fmt::Write as _;
    use std::path::Path;

    /// GGUF types the weight kernels read: name, type id, values per block
    /// and bytes per block as the backend stores it (padded to whole words).
    const TYPES: [(&str, u32, u32, u32); 11] = [
        ("f32", 0, 1, 4),
        ("f16", 1, 1, 2),
        ("bf16", 30, 1, 2),
        ("q4_0", 2, 32, 20),
        ("q4_1", 3, 32, 20),
        ("q5_0", 6, 32, 24),
        ("q5_1", 7, 32, 24),
        ("q8_0", 8, 32, 36),
        ("q4_k", 12, 256, 144),
        ("q5_k", 13, 256, 176),
        ("q6_k", 14, 256, 212),
    ];

    pub fn build() {
        let out = std::env::var("OUT_DIR").expect("OUT_DIR");
        let out = Path::new(&out);
        let read = |f: &str| {
            std::fs::read_to_string(Path::new("shaders").join(f))
                .unwrap_or_else(|e| panic!("shaders/{f}: {e}"))
        };
        let mut list = String::from("/// SPIR-V of every kernel: its name, entry point and module.\npub static SPIRV: &[(&str, &std::ffi::CStr, &[u8])] = &[\n");
        let quant = read("quant.wgsl");
        for (name, id, block, bytes) in TYPES {
            let src = format!(
                "const QTYPE: u32 = {id}u;\nconst BLOCK: u32 = {block}u;\nconst BYTES: u32 = {bytes}u;\n{quant}"
            );
            for entry in ["matmul", "embed"] {
                emit(&src, entry, &format!("{entry}_{name}"), out, &mut list);
            }
        }
        let common = read("common.wgsl");
        let ops = format!("{common}\n{}", read("ops.wgsl"));
        for entry in ["rms_norm", "layer_norm", "eltwise", "rope", "attend_dense"] {
            emit(&ops, entry, entry, out, &mut list);
        }
        let kv = format!("{common}\n{}", read("kv.wgsl"));
        for entry in ["kv_write", "attention"] {
            emit(&kv, entry, entry, out, &mut list);
        }
        list.push_str("];\n");
        std::fs::write(out.join("spirv.rs"), list).expect("writing spirv.rs");
    }

    fn emit(src: &str, entry: &str, name: &str, out: &Path, list: &mut String) {
        use naga::back::spv;
        use naga::valid::{Capabilities, ValidationFlags, Validator};
        let module = naga::front::wgsl::parse_str(src)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        // Barriers sit where every invocation of a workgroup reaches them,
        // behind conditions on values the whole workgroup shares (a row's
        // length read from memory), which WGSL's analysis cannot see.
        let flags = ValidationFlags::all() - ValidationFlags::CONTROL_FLOW_UNIFORMITY;
        let caps = Capabilities::IMMEDIATES | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
        let info = Validator::new(flags, caps)
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(src)));
        let options = spv::Options {
            lang_version: (1, 3),
            flags: spv::WriterFlags::empty(),
            ..Default::default()
        };
        let pipeline = spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: entry.into(),
        };
        let words = spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let file = format!("{name}.spv");
        std::fs::write(out.join(&file), bytes).expect("writing SPIR-V");
        writeln!(
            list,
            "    ({name:?}, c{entry:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{file}\"))),"
        )
        .unwrap();
    }
}
