//! An exclusive lock on `--state-dir`: two flowhost processes on one job store would
//! each run the other's queued jobs and each reconcile the other's running ones as
//! lost. The second one fails at start, naming the directory and the holder's pid.
//!
//! Owns the lock file (`flowhost.lock` in the state dir, an OS advisory lock released
//! when the process ends, even by SIGKILL). Must never delete or truncate anything
//! else in the state dir.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Held for the life of the service; dropping it releases the lock.
#[derive(Debug)]
pub struct StateDirLock {
    _file: File,
}

/// Lock `dir` (creating it), or fail at once if another process holds it.
pub fn acquire(dir: &Path) -> Result<StateDirLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = dir.join("flowhost.lock");
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() || holder.len() > 20 { "another flowhost".to_string() } else { format!("another flowhost (pid {holder})") };
            bail!("the state directory {} is in use by {who}; give each flowhost its own --state-dir (FLOWHOST_STATE_DIR)", dir.display());
        }
        Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    }
    // Say who holds it (for the message above); the lock, not the text, is what counts.
    file.set_len(0).and_then(|()| file.rewind()).and_then(|()| write!(file, "{}", std::process::id())).with_context(|| format!("writing {}", path.display()))?;
    Ok(StateDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_obeyed_and_a_second_violated_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = acquire(&state).unwrap();
        let err = format!("{:#}", acquire(&state).unwrap_err());
        assert!(err.contains("in use by another flowhost") && err.contains(&std::process::id().to_string()), "{err}");
        assert!(err.contains("--state-dir"), "{err}");
        drop(first);
        acquire(&state).expect("free again once the first holder is gone");
    }
}
