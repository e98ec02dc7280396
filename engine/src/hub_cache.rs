//! Models named by their Hugging Face id (`org/name`, `org/name@revision`,
//! `org/name:Q4_K_M`), found offline in the local Hugging Face cache as
//! `huggingface_hub` lays it out. Nothing is downloaded.
//!
//! The layout: `<cache>/models--<org>--<name>/refs/<revision>` holds a commit
//! hash, `snapshots/<commit>/` holds the repository's files (links into
//! `blobs/`). The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

/// A Hugging Face model reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` when none is given.
    pub revision: String,
    /// The quantization a GGUF repository's file is picked by (`Q4_K_M`).
    pub quant: Option<String>,
}

/// What an id resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// A snapshot folder (safetensors, config.json) or one GGUF file in it.
    pub path: PathBuf,
    /// The repository's vision projector (`mmproj*.gguf`), for a GGUF pick.
    pub mmproj: Option<PathBuf>,
}

/// Why an id did not resolve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubError {
    /// The repository is not in the cache.
    #[error("{repo} is not in the Hugging Face cache {cache} (embodyd downloads nothing: fetch it with `huggingface-cli download {repo}` first)")]
    NotCached {
        /// `org/name`.
        repo: String,
        /// The cache folder looked in.
        cache: String,
    },
    /// The revision is not in the cache.
    #[error("{repo} has no revision {revision:?} in the cache (known: {known})")]
    NoRevision {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The refs the cache holds.
        known: String,
    },
    /// The snapshot holds no model, or several and no quant picks one.
    #[error("{repo}: {why}")]
    NoModel {
        /// `org/name`.
        repo: String,
        /// What is there.
        why: String,
    },
}

impl HubId {
    /// Reads `org/name[@revision][:QUANT]`; `None` when `s` is not of that
    /// shape (a path, say).
    pub fn parse(s: &str) -> Option<Self> {
        let (rest, quant) = match s.rsplit_once(':') {
            Some((r, q)) if !q.is_empty() && !q.contains('/') => (r, Some(q.to_string())),
            _ => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        // A revision names a file under refs/ (branches may hold '/'): it
        // must not climb out of it.
        let revision_ok = !revision.starts_with('/')
            && revision
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !revision_ok {
            return None;
        }
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (part(org) && part(name)).then(|| Self {
            repo: repo.to_string(),
            revision,
            quant,
        })
    }
}

/// The cache folder, from the environment as `huggingface_hub` reads it.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| {
        var("HOME")
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".cache")
    });
    cache.join("huggingface").join("hub")
}

/// Finds `id` in the cache at `cache`.
pub fn resolve(id: &HubId, cache: &Path) -> Result<Resolved, HubError> {
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(HubError::NotCached {
            repo: id.repo.clone(),
            cache: cache.display().to_string(),
        });
    }
    let commit = if is_commit(&id.revision) {
        id.revision.clone()
    } else {
        let refs = repo_dir.join("refs");
        std::fs::read_to_string(refs.join(&id.revision))
            .map(|s| s.trim().to_string())
            .map_err(|_| HubError::NoRevision {
                repo: id.repo.clone(),
                revision: id.revision.clone(),
                known: list(&refs).join(", "),
            })?
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !is_commit(&commit) || !snapshot.is_dir() {
        return Err(HubError::NoRevision {
            repo: id.repo.clone(),
            revision: id.revision.clone(),
            known: list(&repo_dir.join("snapshots")).join(", "),
        });
    }
    let no_model = |why: String| HubError::NoModel {
        repo: id.repo.clone(),
        why,
    };
    let mut ggufs = Vec::new();
    gguf_files(&snapshot, &mut ggufs);
    ggufs.sort();
    let (mmproj, weights): (Vec<PathBuf>, Vec<PathBuf>) = ggufs
        .into_iter()
        .partition(|p| file_name(p).starts_with("mmproj"));
    let mmproj = (mmproj.len() == 1).then(|| mmproj[0].clone());
    if id.quant.is_none() && snapshot.join("config.json").is_file() {
        return Ok(Resolved {
            path: snapshot,
            mmproj: None,
        });
    }
    let quant = id.quant.as_deref().map(str::to_ascii_uppercase);
    let names: Vec<String> = weights.iter().map(|p| file_name(p)).collect();
    let pick = match &quant {
        Some(q) => {
            let hits: Vec<&PathBuf> = weights
                .iter()
                .filter(|p| quant_of(&file_name(p)).as_deref() == Some(q.as_str()))
                .collect();
            match hits.as_slice() {
                [one] => (*one).clone(),
                [] => {
                    return Err(no_model(format!(
                        "no GGUF file of quantization {q} in the snapshot (files: {})",
                        names.join(", ")
                    )))
                }
                many => {
                    // Shards of one model: the first shard opens the rest.
                    many[0].clone()
                }
            }
        }
        None => match weights.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(no_model(
                    "the snapshot has neither config.json nor a GGUF file".into(),
                ))
            }
            _ => weights
                .iter()
                .find(|p| quant_of(&file_name(p)).as_deref() == Some("Q4_K_M"))
                .cloned()
                .ok_or_else(|| {
                    no_model(format!(
                        "several GGUF files; name one by its quantization, as in {}:Q8_0 (files: {})",
                        id.repo,
                        names.join(", ")
                    ))
                })?,
        },
    };
    Ok(Resolved { path: pick, mmproj })
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn list(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// GGUF files under `dir` (repositories keep large quants in subfolders).
fn gguf_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            gguf_files(&p, out);
        } else if p
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
        {
            out.push(p);
        }
    }
}

/// The quantization a GGUF file's name carries (`...-Q4_K_M.gguf`,
/// `....q4_k_m-00001-of-00002.gguf`), upper case.
fn quant_of(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    // Shards end in -00001-of-00003.
    let stem = match stem.rsplit_once("-of-") {
        Some((head, tail)) if tail.bytes().all(|b| b.is_ascii_digit()) => {
            head.rsplit_once('-').map_or(head, |(h, _)| h)
        }
        _ => stem,
    };
    const KNOWN: [&str; 16] = [
        "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M",
        "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K",
    ];
    let upper = stem.to_ascii_uppercase();
    KNOWN
        .iter()
        .filter(|q| {
            upper.ends_with(*q)
                && upper[..upper.len() - q.len()]
                    .chars()
                    .last()
                    .is_none_or(|c| matches!(c, '-' | '.' | '_'))
        })
        .max_by_key(|q| q.len())
        .map(|q| q.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_with_revision_and_quant() {
        let id = HubId::parse("Qwen/Qwen2-VL-2B-Instruct").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str(), id.quant),
            ("Qwen/Qwen2-VL-2B-Instruct", "main", None)
        );
        let id = HubId::parse("org/name@refs/pr/1").unwrap();
        assert_eq!(id.revision, "refs/pr/1");
        let id = HubId::parse("bartowski/SmolLM2-135M-Instruct-GGUF@v1.0:q4_k_m").unwrap();
        assert_eq!(id.revision, "v1.0");
        assert_eq!(id.quant.as_deref(), Some("q4_k_m"));
        for not_an_id in [
            "model.gguf",
            "/abs/path/model.gguf",
            "a/b/c",
            "../x",
            "./x",
            "org/",
            "org/name@",
            "org/na me",
            "org/name@../../../etc/passwd",
            "org/name@/etc/passwd",
            "org/name@a//b",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn quants_are_read_from_file_names() {
        assert_eq!(
            quant_of("SmolLM2-135M-Instruct-Q4_K_M.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(
            quant_of("qwen2.5-0.5b-instruct-q8_0.gguf").as_deref(),
            Some("Q8_0")
        );
        assert_eq!(quant_of("model.Q4_1.gguf").as_deref(), Some("Q4_1"));
        assert_eq!(
            quant_of("big-Q4_K_M-00001-of-00002.gguf").as_deref(),
            Some("Q4_K_M")
        );
        assert_eq!(quant_of("model.gguf"), None);
        assert_eq!(quant_of("modelQ4_0.gguf"), None);
    }
}
