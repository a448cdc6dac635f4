//! Which file owns each route, kept on disk so that ownership outlives the process.
//!
//! While the service runs, a route stays with the file that serves it (the watcher's rule). A
//! cold start has no "before" in memory: without this record, whichever file name sorts first
//! would win, and an impostor `aaa-impostor.wasm` claiming `/flux-dev` would take the route from
//! `flux_dev.wasm` at the next container start. The record (`plugin-routes.json` in the state
//! dir) is rewritten after every scan that changes it; at start it decides ties.
//!
//! Owns: reading and writing the record. Must never: decide who serves (the watcher does), or
//! fail a scan because the record cannot be read or written (it logs and goes on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The record's file name inside the state dir.
pub const FILE_NAME: &str = "plugin-routes.json";

/// Route → file name (inside the plugin folder) of its owner.
pub type Owners = BTreeMap<String, String>;

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// Which file owns each route.
    routes: Owners,
}

/// The record on disk.
#[derive(Debug, Clone)]
pub struct RouteOwners {
    path: PathBuf,
}

impl RouteOwners {
    /// The record in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        Self { path: state_dir.join(FILE_NAME) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded owners; empty when there is no record yet, or it is unreadable (logged).
    pub fn load(&self) -> Owners {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Owners::new(),
            Err(err) => {
                tracing::warn!(file = %self.path.display(), error = %err, "cannot read the route ownership record; routes go to files in name order");
                return Owners::new();
            }
        };
        match serde_json::from_slice::<Record>(&text) {
            Ok(record) => record.routes,
            Err(err) => {
                tracing::warn!(file = %self.path.display(), error = %err, "the route ownership record is not valid; routes go to files in name order");
                Owners::new()
            }
        }
    }

    /// Replace the record (atomically: a crash leaves the old or the new one).
    pub fn save(&self, owners: &Owners) {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let body = serde_json::to_vec_pretty(&Record { routes: owners.clone() }).map_err(std::io::Error::other)?;
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, body)?;
            std::fs::rename(&tmp, &self.path)
        };
        if let Err(err) = write() {
            tracing::warn!(file = %self.path.display(), error = %err, "cannot write the route ownership record; a restart may hand routes to other files");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_round_trip_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let owners = RouteOwners::in_dir(&dir.path().join("state"));
        assert!(owners.load().is_empty());
        let mut routes = Owners::new();
        routes.insert("/flux-dev".into(), "flux_dev.wasm".into());
        owners.save(&routes);
        assert_eq!(owners.load(), routes);
        std::fs::write(owners.path(), b"not json").unwrap();
        assert!(owners.load().is_empty());
    }
}
