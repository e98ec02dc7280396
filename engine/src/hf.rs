//! Hugging Face model folders: `config.json`, `generation_config.json`, and the
//! weights in `model.safetensors` or in the shards that
//! `model.safetensors.index.json` lists.
//!
//! Weight files are memory-mapped and read through the `safetensors` crate; F32,
//! F16 and BF16 tensors become [`QTensor`]s over the file's bytes, without
//! conversion: copied into memory of their own where there is room
//! ([`FileBytes::resident`]), else mapped. Safetensors lists dimensions outermost first (PyTorch's order) and
//! the engine innermost first (GGUF's order), so a linear weight stored as
//! `[out, in]` is the engine's `[in, out]`: the same bytes, rows of `in` values.
//!
//! Configs are read as published: each model deserializes `config.json` into its
//! own struct named after the file's fields, and a field of the wrong type is an
//! error naming the file and the field.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::quant::GgmlType;
use crate::sampling::SamplingParams;
use crate::tensor::{Bytes, FileBytes, QTensor};
use crate::{Error, Result};

/// The single-file weights of a folder.
pub const WEIGHTS: &str = "model.safetensors";
/// The index of a folder whose weights are sharded.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// One tensor's place in a mapped weight file.
struct Entry {
    file: Arc<FileBytes>,
    /// Index into `HfFolder::files`.
    file_idx: usize,
    dtype: Dtype,
    /// Outermost first, as the file writes it.
    shape: Vec<usize>,
    range: Range<usize>,
}

/// An opened Hugging Face model folder.
pub struct HfFolder {
    dir: PathBuf,
    config_path: PathBuf,
    config: serde_json::Value,
    generation: GenerationConfig,
    /// The weight files, in the order they were opened.
    files: Vec<PathBuf>,
    /// Where missing tensors are reported: the index, or the single weight file.
    weights_path: PathBuf,
    tensors: HashMap<String, Entry>,
}

impl std::fmt::Debug for HfFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfFolder")
            .field("dir", &self.dir)
            .field("files", &self.files)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Sampling defaults from `generation_config.json`, field names as published.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    /// `false`: greedy decoding.
    #[serde(default)]
    pub do_sample: Option<bool>,
    /// Softmax temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Top-k cut-off.
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Nucleus threshold.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Min-p threshold.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// CTRL-style repetition penalty (llama.cpp's repeat penalty).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Default generation length.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// `base` with the folder's defaults applied (`do_sample: false` is greedy).
    pub fn sampling(&self, base: SamplingParams) -> SamplingParams {
        let mut s = base;
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(k) = self.top_k {
            s.top_k = k;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(p) = self.min_p {
            s.min_p = p;
        }
        if let Some(r) = self.repetition_penalty {
            s.repeat_penalty = r;
        }
        if self.do_sample == Some(false) {
            s.temperature = 0.0;
        }
        s
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Metadata {
        path: path.to_path_buf(),
        key: "(file)".into(),
        message: format!("not valid JSON: {e}"),
    })
}

/// Deserializes `value` (the part of `path` at `prefix`) into `T`, naming the
/// field that does not fit.
fn deserialize<T: DeserializeOwned>(
    path: &Path,
    prefix: &str,
    value: &serde_json::Value,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A missing field is reported at its parent; name it in the key.
        let field = match (field.as_str(), inner.strip_prefix("missing field `")) {
            (".", Some(rest)) => rest.trim_end_matches('`').to_string(),
            (p, Some(rest)) => format!("{p}.{}", rest.trim_end_matches('`')),
            _ => field,
        };
        let key = if prefix.is_empty() {
            field
        } else if field == "." {
            prefix.to_string()
        } else {
            format!("{prefix}.{field}")
        };
        Error::Metadata {
            path: path.to_path_buf(),
            key,
            message: inner,
        }
    })
}

fn map_file(path: &Path) -> Result<Arc<FileBytes>> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    // SAFETY: the map is read-only; a model file changed underneath a running
    // process is outside what the engine can defend against (as with GGUF).
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io_err(path, e))?;
    Ok(Arc::new(FileBytes::Mapped(map)))
}

/// The shard file names an index lists, field names as published.
#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl HfFolder {
    /// Opens a folder: reads `config.json` and `generation_config.json` (when
    /// present) and maps the weight files, then copies the tensors a forward
    /// pass reads whole into memory of their own where there is room.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut folder = Self::open_mapped(dir)?;
        folder.make_resident()?;
        Ok(folder)
    }

    /// [`HfFolder::open`] with every tensor left in the file maps.
    pub fn open_mapped(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(io_err(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a model folder"),
            ));
        }
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        if !config.is_object() {
            return Err(Error::Metadata {
                path: config_path,
                key: "(file)".into(),
                message: "expected a JSON object".into(),
            });
        }
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            deserialize(&gen_path, "", &read_json(&gen_path)?)?
        } else {
            GenerationConfig::default()
        };

        let mut folder = Self {
            dir: dir.to_path_buf(),
            config_path,
            config,
            generation,
            files: Vec::new(),
            weights_path: dir.join(WEIGHTS),
            tensors: HashMap::new(),
        };
        let index_path = dir.join(WEIGHTS_INDEX);
        if index_path.exists() {
            folder.open_shards(&index_path)?;
        } else if folder.weights_path.exists() {
            let path = folder.weights_path.clone();
            folder.add_file(&path)?;
        } else {
            return Err(io_err(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {WEIGHTS} or {WEIGHTS_INDEX} in the model folder"),
                ),
            ));
        }
        Ok(folder)
    }

    /// Copies each weight file's tensors, but an embedding table apart from
    /// the output matrix (read a few rows per token), into memory of their own.
    fn make_resident(&mut self) -> Result<()> {
        let has_head = self.tensors.keys().any(|n| n.ends_with("lm_head.weight"));
        let whole = |name: &str| !(has_head && name.ends_with("embed_tokens.weight"));
        for (idx, path) in self.files.iter().enumerate() {
            let ranges: Vec<Range<usize>> = self
                .tensors
                .iter()
                .filter(|(name, e)| e.file_idx == idx && whole(name))
                .map(|(_, e)| e.range.clone())
                .collect();
            let Some(len) = self
                .tensors
                .values()
                .find(|e| e.file_idx == idx)
                .map(|e| e.file.len())
            else {
                continue;
            };
            let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
            let Some(copy) = FileBytes::resident(&f, len, &ranges).map_err(|e| io_err(path, e))?
            else {
                continue;
            };
            let copy = Arc::new(copy);
            for (name, e) in self.tensors.iter_mut() {
                if e.file_idx == idx && whole(name) {
                    e.file = copy.clone();
                }
            }
        }
        Ok(())
    }

    fn open_shards(&mut self, index_path: &Path) -> Result<()> {
        self.weights_path = index_path.to_path_buf();
        let index: Index = deserialize(index_path, "", &read_json(index_path)?)?;
        let mut shards: Vec<&String> = index.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            // Shard names are file names inside the folder, never paths out of it.
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                return Err(Error::Metadata {
                    path: index_path.to_path_buf(),
                    key: "weight_map".into(),
                    message: format!("shard '{shard}' is not a file name in the folder"),
                });
            }
            let path = self.dir.join(shard);
            if !path.exists() {
                let tensor = index
                    .weight_map
                    .iter()
                    .find(|(_, s)| *s == shard)
                    .map(|(t, _)| t);
                return Err(Error::Metadata {
                    path: index_path.to_path_buf(),
                    key: "weight_map".into(),
                    message: format!(
                        "shard '{shard}' (holding '{}') is missing from {}",
                        tensor.map_or("", |t| t.as_str()),
                        self.dir.display()
                    ),
                });
            }
            self.add_file(&path)?;
        }
        for (tensor, shard) in &index.weight_map {
            match self.tensors.get(tensor) {
                Some(e)
                    if self.files[e.file_idx].file_name().and_then(|n| n.to_str())
                        == Some(shard) => {}
                _ => {
                    return Err(Error::Tensor {
                        path: self.dir.join(shard),
                        tensor: tensor.clone(),
                        message: format!("listed in {WEIGHTS_INDEX} but not in this shard"),
                    })
                }
            }
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = map_file(path)?;
        self.add_bytes(path, file)
    }

    fn add_bytes(&mut self, path: &Path, file: Arc<FileBytes>) -> Result<()> {
        let (header, meta) = SafeTensors::read_metadata(&file).map_err(|e| Error::Tensor {
            path: path.to_path_buf(),
            tensor: "(header)".into(),
            message: format!("invalid safetensors file: {e}"),
        })?;
        // read_metadata checked that the offsets tile the data section exactly.
        let base = 8 + header;
        // The header is parsed: its pages are not read again.
        file.release(0..base);
        let file_idx = self.files.len();
        self.files.push(path.to_path_buf());
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let entry = Entry {
                file: file.clone(),
                file_idx,
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: base + start..base + end,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(Error::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    message: "appears in more than one weight file".into(),
                });
            }
        }
        Ok(())
    }

    /// A folder held in memory: `config.json`'s text and one safetensors file
    /// (tests and fuzzing). `name` stands for the folder in errors.
    pub fn from_bytes(
        name: impl Into<PathBuf>,
        config_json: &[u8],
        weights: Vec<u8>,
    ) -> Result<Self> {
        let dir: PathBuf = name.into();
        let config_path = dir.join("config.json");
        let config: serde_json::Value =
            serde_json::from_slice(config_json).map_err(|e| Error::Metadata {
                path: config_path.clone(),
                key: "(file)".into(),
                message: format!("not valid JSON: {e}"),
            })?;
        let mut folder = Self {
            weights_path: dir.join(WEIGHTS),
            dir,
            config_path,
            config,
            generation: GenerationConfig::default(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        let path = folder.weights_path.clone();
        folder.add_bytes(&path, Arc::new(FileBytes::Owned(weights)))?;
        Ok(folder)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `config.json`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `config.json` as parsed JSON.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config
    }

    /// `config.json` deserialized into a model's config struct.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T> {
        deserialize(&self.config_path, "", &self.config)
    }

    /// The object at `path` of `config.json` (dotted, such as `text_config`;
    /// empty for the whole file) deserialized.
    pub fn config_at<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let mut v = &self.config;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            v = v.get(part).ok_or_else(|| Error::Metadata {
                path: self.config_path.clone(),
                key: path.into(),
                message: "missing".into(),
            })?;
        }
        deserialize(&self.config_path, path, v)
    }

    /// The architecture `config.json` names: the first of `architectures`, else
    /// `model_type`.
    pub fn architecture(&self) -> Result<String> {
        #[derive(Deserialize)]
        struct Arch {
            #[serde(default)]
            architectures: Option<Vec<String>>,
            #[serde(default)]
            model_type: Option<String>,
        }
        let a: Arch = self.config()?;
        a.architectures
            .and_then(|v| v.into_iter().next())
            .or(a.model_type)
            .ok_or_else(|| Error::Metadata {
                path: self.config_path.clone(),
                key: "architectures".into(),
                message: "neither 'architectures' nor 'model_type' is set".into(),
            })
    }

    /// The defaults of `generation_config.json` (empty when the folder has none).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// The weight files opened.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Bytes of all tensors.
    pub fn weights_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.range.len() as u64).sum()
    }

    /// Bytes of tensors copied into memory of their own (not read through a
    /// file map).
    pub fn resident_bytes(&self) -> u64 {
        self.tensors
            .values()
            .filter(|e| !matches!(*e.file, FileBytes::Mapped(_)))
            .map(|e| e.range.len() as u64)
            .sum()
    }

    /// Whether the weights hold a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A tensor's dtype as the file names it ("BF16"), its shape (outermost
    /// first, as the file writes it) and its bytes; whatever the dtype, so
    /// that a listing shows tensors the models cannot read too.
    pub fn tensor_info(&self, name: &str) -> Option<(String, &[usize], usize)> {
        let e = self.tensors.get(name)?;
        Some((format!("{:?}", e.dtype), &e.shape, e.range.len()))
    }

    /// The file that holds `name`, or where it would be listed.
    pub fn tensor_path(&self, name: &str) -> &Path {
        match self.tensors.get(name) {
            Some(e) => &self.files[e.file_idx],
            None => &self.weights_path,
        }
    }

    /// A tensor over the mapped bytes, shape innermost first.
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        let e = self.tensors.get(name).ok_or_else(|| Error::Tensor {
            path: self.weights_path.clone(),
            tensor: name.into(),
            message: "missing".into(),
        })?;
        let ty = match e.dtype {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(Error::Tensor {
                    path: self.files[e.file_idx].clone(),
                    tensor: name.into(),
                    message: format!("dtype {other:?} is not supported (F32, F16, BF16)"),
                })
            }
        };
        let shape: Vec<usize> = if e.shape.is_empty() {
            vec![1]
        } else {
            e.shape.iter().rev().copied().collect()
        };
        Ok(QTensor {
            name: name.into(),
            ty,
            shape,
            data: Bytes::new(e.file.clone(), e.range.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Cfg {
        #[allow(dead_code)]
        hidden_size: usize,
        #[allow(dead_code)]
        rope: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    struct Inner {
        #[allow(dead_code)]
        theta: f32,
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = Path::new("/m/config.json");
        let e = deserialize::<Cfg>(p, "", &serde_json::json!({"hidden_size": "64"})).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("config.json") && s.contains("'hidden_size'") && s.contains("string"),
            "{s}"
        );
        let e = deserialize::<Cfg>(p, "", &serde_json::json!({})).unwrap_err();
        assert!(e.to_string().contains("'hidden_size'"), "{e}");
        let v = serde_json::json!({"hidden_size": 8, "rope": {"theta": "x"}});
        let e = deserialize::<Cfg>(p, "text_config", &v).unwrap_err();
        assert!(e.to_string().contains("'text_config.rope.theta'"), "{e}");
        let e = deserialize::<Cfg>(p, "", &serde_json::json!({"hidden_size": 8, "rope": {}}))
            .unwrap_err();
        assert!(e.to_string().contains("'rope.theta'"), "{e}");
    }

    #[test]
    fn generation_defaults_apply_over_the_base() {
        let g: GenerationConfig = serde_json::from_value(
            serde_json::json!({"temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}),
        )
        .unwrap();
        let s = g.sampling(SamplingParams::default());
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.repeat_penalty),
            (0.7, 20, 0.95, 1.1)
        );
        let greedy = GenerationConfig {
            do_sample: Some(false),
            ..g
        };
        assert_eq!(greedy.sampling(SamplingParams::default()).temperature, 0.0);
    }
}
