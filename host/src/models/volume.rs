//! Listing the model files present on the volume, cheaply enough to run on every
//! plugin request.
//!
//! A listing is cached per folder and reused while it is younger than `max_age`
//! (default 1 s) *and* no directory it walked has a changed mtime; otherwise the folder
//! is walked again. So a file added or renamed into place is seen on the next call
//! (directory mtime), and a file growing in place within `max_age`.
//!
//! Owns reading directory entries and sizes. Must never open file contents, write to
//! the volume, or list anything outside the folders of [`super::folders`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::folders::{FileFilter, ModelFolder, resolve_folder};

/// How long a listing is trusted without re-walking, even when no mtime changed.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(1);

/// Symlinked directory trees deeper than this are not followed further.
const MAX_DEPTH: usize = 16;

/// A model file present on the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelFile {
    /// Path inside the folder, `/`-separated (`flux/my-style.safetensors`).
    pub name: String,
    /// Size in bytes; never 0 (empty files are as good as missing).
    pub size: u64,
}

/// The model volume mounted at `--models DIR`. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct ModelVolume {
    root: PathBuf,
    max_age: Duration,
    listings: Mutex<HashMap<&'static str, Arc<FolderListing>>>,
}

#[derive(Debug)]
struct FolderListing {
    files: Vec<ModelFile>,
    /// Every directory walked (or looked for), with its mtime then (`None` = absent).
    walked_dirs: Vec<(PathBuf, Option<SystemTime>)>,
    listed_at: Instant,
}

impl ModelVolume {
    /// A volume rooted at `root`. Nothing is read until the first `list`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_max_age(root, DEFAULT_MAX_AGE)
    }

    /// Like [`ModelVolume::new`] with another cache age (0 = re-walk on every call).
    pub fn with_max_age(root: impl Into<PathBuf>, max_age: Duration) -> Self {
        Self {
            root: root.into(),
            max_age,
            listings: Mutex::new(HashMap::new()),
        }
    }

    /// The volume's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The model files present in `folder` (`loras`, `text_encoders`, ... or ComfyUI's
    /// legacy `clip`/`unet`), recursively, sorted by name. Broken symlinks, empty files,
    /// hidden entries and (in weight folders) non-weight files are not listed. An
    /// unknown folder name (including anything with `/` or `..`) lists as empty.
    pub fn list(&self, folder: &str) -> Vec<ModelFile> {
        let Some(folder) = resolve_folder(folder) else {
            return Vec::new();
        };
        if let Some(listing) = self.lock_listings().get(folder.name).cloned()
            && listing.listed_at.elapsed() < self.max_age
            && listing.is_current()
        {
            return listing.files.clone();
        }
        let listing = Arc::new(self.walk_folder(folder));
        let files = listing.files.clone();
        self.lock_listings().insert(folder.name, listing);
        files
    }

    /// The file `name` in `folder`, if present.
    pub fn find(&self, folder: &str, name: &str) -> Option<ModelFile> {
        let files = self.list(folder);
        files
            .binary_search_by(|file| file.name.as_str().cmp(name))
            .ok()
            .and_then(|index| files.into_iter().nth(index))
    }

    fn lock_listings(&self) -> MutexGuard<'_, HashMap<&'static str, Arc<FolderListing>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single
        // insert), so a poisoned lock is still usable.
        self.listings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn walk_folder(&self, folder: &ModelFolder) -> FolderListing {
        let mut walk = FolderWalk {
            filter: folder.filter,
            files: BTreeMap::new(),
            walked_dirs: Vec::new(),
            visited: HashSet::new(),
        };
        for dir in folder.dirs {
            walk.walk(&self.root.join(dir), "", 0);
        }
        FolderListing {
            files: walk
                .files
                .into_iter()
                .map(|(name, size)| ModelFile { name, size })
                .collect(),
            walked_dirs: walk.walked_dirs,
            listed_at: Instant::now(),
        }
    }
}

impl FolderListing {
    fn is_current(&self) -> bool {
        self.walked_dirs
            .iter()
            .all(|(dir, mtime)| modified(dir) == *mtime)
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|meta| meta.modified()).ok()
}

struct FolderWalk {
    filter: FileFilter,
    /// name → size; the first directory of a folder wins, as in ComfyUI.
    files: BTreeMap<String, u64>,
    walked_dirs: Vec<(PathBuf, Option<SystemTime>)>,
    visited: HashSet<PathBuf>,
}

impl FolderWalk {
    fn walk(&mut self, dir: &Path, prefix: &str, depth: usize) {
        let meta = fs::metadata(dir).ok();
        self.walked_dirs.push((
            dir.to_path_buf(),
            meta.as_ref().and_then(|m| m.modified().ok()),
        ));
        if !meta.is_some_and(|m| m.is_dir()) {
            return;
        }
        // Symlinked directories are followed (as ComfyUI does), but never twice.
        let identity = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !self.visited.insert(identity) {
            return;
        }
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot list model directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let Ok(file_name) = entry.file_name().into_string() else {
                continue; // not addressable by a plugin or a ComfyUI graph
            };
            if file_name.starts_with('.') {
                continue; // download caches, partial files, editor droppings
            }
            let path = entry.path();
            // `fs::metadata` follows symlinks: a broken link fails here and is skipped.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let name = format!("{prefix}{file_name}");
            if meta.is_dir() {
                if depth < MAX_DEPTH {
                    self.walk(&path, &format!("{name}/"), depth + 1);
                }
            } else if meta.is_file() && meta.len() > 0 && self.filter.accepts(&file_name) {
                self.files.entry(name).or_insert(meta.len());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, relative: &str, bytes: &[u8]) {
        let path = root.join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    fn names(files: &[ModelFile]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn lists_files_recursively_with_sizes_and_slash_names() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "loras/style.safetensors", b"abc");
        write(dir.path(), "loras/flux/realism.safetensors", b"abcdef");
        let volume = ModelVolume::new(dir.path());
        assert_eq!(
            volume.list("loras"),
            vec![
                ModelFile {
                    name: "flux/realism.safetensors".into(),
                    size: 6
                },
                ModelFile {
                    name: "style.safetensors".into(),
                    size: 3
                },
            ]
        );
    }

    #[test]
    fn empty_files_broken_links_partials_and_hidden_entries_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "loras/empty.safetensors", b"");
        write(dir.path(), "loras/big.safetensors.part", b"partial");
        write(dir.path(), "loras/.cache/huggingface/x.safetensors", b"x");
        write(dir.path(), "loras/notes.txt", b"not a model");
        std::os::unix::fs::symlink(
            dir.path().join("nowhere.safetensors"),
            dir.path().join("loras/dangling.safetensors"),
        )
        .unwrap();
        write(dir.path(), "loras/real.safetensors", b"weights");
        let volume = ModelVolume::new(dir.path());
        assert_eq!(names(&volume.list("loras")), vec!["real.safetensors"]);
    }

    #[test]
    fn a_symlink_to_a_real_file_is_listed_with_the_target_size() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "store/blob", b"12345");
        fs::create_dir_all(dir.path().join("vae")).unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("store/blob"),
            dir.path().join("vae/ae.safetensors"),
        )
        .unwrap();
        let volume = ModelVolume::new(dir.path());
        assert_eq!(
            volume.find("vae", "ae.safetensors").map(|f| f.size),
            Some(5)
        );
    }

    #[test]
    fn traversal_and_unknown_folder_names_list_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "loras/a.safetensors", b"a");
        write(dir.path(), "secret/key.safetensors", b"k");
        let volume = ModelVolume::new(dir.path().join("loras"));
        for folder in ["..", "../secret", "/etc", "loras/..", "secret", "", "LORAS"] {
            assert!(volume.list(folder).is_empty(), "{folder:?} listed files");
        }
    }

    #[test]
    fn legacy_directories_merge_into_the_folder_comfyui_uses() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "text_encoders/t5xxl_fp16.safetensors", b"t5");
        write(dir.path(), "clip/clip_l.safetensors", b"clip");
        write(dir.path(), "clip/t5xxl_fp16.safetensors", b"shadowed");
        let volume = ModelVolume::new(dir.path());
        let expected = vec![
            ModelFile {
                name: "clip_l.safetensors".into(),
                size: 4,
            },
            ModelFile {
                name: "t5xxl_fp16.safetensors".into(),
                size: 2,
            },
        ];
        assert_eq!(volume.list("text_encoders"), expected);
        assert_eq!(volume.list("clip"), expected);
    }

    #[test]
    fn insightface_lists_onnx_models_in_nested_folders() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "insightface/models/antelopev2/glintr100.onnx",
            b"onnx",
        );
        let volume = ModelVolume::new(dir.path());
        assert_eq!(
            names(&volume.list("insightface")),
            vec!["models/antelopev2/glintr100.onnx"]
        );
    }

    #[test]
    fn a_file_added_while_serving_is_seen_even_within_the_cache_age() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "loras/old.safetensors", b"old");
        // A cache age far beyond the test: only the directory mtime can reveal the change.
        let volume = ModelVolume::with_max_age(dir.path(), Duration::from_secs(3600));
        assert_eq!(names(&volume.list("loras")), vec!["old.safetensors"]);
        write(dir.path(), "loras/new.safetensors.part", b"new");
        fs::rename(
            dir.path().join("loras/new.safetensors.part"),
            dir.path().join("loras/new.safetensors"),
        )
        .unwrap();
        // Make the change visible even on file systems with coarse mtimes.
        let later = SystemTime::now() + Duration::from_secs(5);
        fs::File::open(dir.path().join("loras"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(
            names(&volume.list("loras")),
            vec!["new.safetensors", "old.safetensors"]
        );
    }

    #[test]
    fn a_file_added_in_a_new_subfolder_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let volume = ModelVolume::with_max_age(dir.path(), Duration::from_secs(3600));
        assert!(volume.list("loras").is_empty());
        write(dir.path(), "loras/sub/new.safetensors", b"new");
        assert_eq!(names(&volume.list("loras")), vec!["sub/new.safetensors"]);
    }

    #[test]
    fn a_file_filled_in_place_is_seen_after_the_cache_age() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "vae/ae.safetensors", b"");
        let volume = ModelVolume::with_max_age(dir.path(), Duration::ZERO);
        assert!(volume.list("vae").is_empty());
        fs::write(dir.path().join("vae/ae.safetensors"), b"weights").unwrap();
        assert_eq!(names(&volume.list("vae")), vec!["ae.safetensors"]);
    }

    #[test]
    fn a_symlink_loop_is_walked_once() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "loras/a.safetensors", b"a");
        std::os::unix::fs::symlink(dir.path().join("loras"), dir.path().join("loras/again"))
            .unwrap();
        let volume = ModelVolume::new(dir.path());
        assert_eq!(names(&volume.list("loras")), vec!["a.safetensors"]);
    }
}
