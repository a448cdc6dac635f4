//! A throw-away PostgreSQL cluster per test: `initdb` into a temporary folder, `postgres`
//! on a free loopback port (socket in that folder too), stopped and deleted on drop.
//! PostgreSQL refuses to run as root and CI runs as root, so there both run as `nobody`
//! (through `runuser`) on a folder that user owns. The binaries come from
//! `/usr/lib/postgresql/<newest>/bin` or PATH; `.ci/run` installs Debian's `postgresql`
//! when `initdb` is missing. A missing server fails the test that wanted it: nothing
//! here skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running cluster. `url(db)` names a database in it; [`PgCluster::fresh_database`]
/// makes a new empty one.
pub struct PgCluster {
    dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    pub port: u16,
}

/// Where `initdb` and `postgres` are.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH): `apt-get install postgresql` (.ci/run does)")
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// `program args…`, as `nobody` when we are root.
fn as_server_user(root: bool, program: &Path) -> Command {
    if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl PgCluster {
    /// initdb + start; returns once the server accepts connections.
    pub async fn start() -> Result<PgCluster> {
        let bin = postgres_bin_dir()?;
        let root = running_as_root();
        let dir = tempfile::tempdir()?;
        let home = dir.path().join("pg");
        std::fs::create_dir_all(&home)?;
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            let status = Command::new("chown").args(["nobody:"]).arg(&home).status().context("chown")?;
            if !status.success() {
                bail!("chown of the cluster folder to nobody failed");
            }
        }
        let data = home.join("data");
        let out = as_server_user(root, &bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        let child = as_server_user(root, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&home)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            // A test cluster: durability is not what is under test, speed is welcome.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        let mut cluster = PgCluster { dir, data, bin, child: Some(child), port };
        let started = Instant::now();
        loop {
            if let Some(child) = cluster.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("postgres exited at start ({status}): {}", cluster.log());
                }
            }
            let ok = Command::new(cluster.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(cluster);
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("postgres did not accept connections within 30 s: {}", cluster.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A new empty database; its URL.
    pub async fn fresh_database(&self) -> Result<String> {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&self.url("postgres")).await.context("connecting to the test cluster")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&pool).await?;
        pool.close().await;
        Ok(self.url(&name))
    }

    /// The postmaster's pid (from `postmaster.pid`).
    fn postmaster_pid(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        text.lines().next().map(|l| l.trim().to_string()).filter(|p| p.chars().all(|c| c.is_ascii_digit()))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // SIGQUIT: PostgreSQL's immediate shutdown (all backends end at once). Through
        // the postmaster's own pid: under runuser our child is runuser, not postgres.
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-QUIT", &pid]).status();
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let started = Instant::now();
            while proc_dir.exists() && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if proc_dir.exists() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
        if let Some(mut child) = self.child.take() {
            let started = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && started.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
