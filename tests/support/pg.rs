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
    root: bool,
    /// Server settings beyond the defaults (TLS).
    extra: Vec<String>,
    pub port: u16,
    /// With [`PgCluster::start_tls`]: the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
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
        Self::start_with(false).await
    }

    /// As [`PgCluster::start`], with TLS on (`ssl=on`): a CA and a server certificate for
    /// 127.0.0.1 and localhost are made now with the `openssl` command (Debian's
    /// `postgresql` package depends on it; `.ci/run` installs it besides). Clients may
    /// still connect without TLS (the test cluster's pg_hba is `trust` for every host).
    pub async fn start_tls() -> Result<PgCluster> {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Result<PgCluster> {
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
        let (extra, ca_file) = if tls {
            let (cert, key, ca) = make_certificates(dir.path(), &home, root)?;
            let extra = vec!["-c".into(), "ssl=on".into(), "-c".into(), format!("ssl_cert_file={}", cert.display()), "-c".into(), format!("ssl_key_file={}", key.display())];
            (extra, Some(ca))
        } else {
            (Vec::new(), None)
        };
        let port = crate::free_port();
        let mut cluster = PgCluster { dir, data, bin, child: None, root, extra, port, ca_file };
        cluster.run_server().await?;
        Ok(cluster)
    }

    /// Start the postmaster on the cluster's port and wait until it accepts connections.
    async fn run_server(&mut self) -> Result<()> {
        let home = self.dir.path().join("pg");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("postgres.log"))?;
        let child = as_server_user(self.root, &self.bin.join("postgres"))
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&home)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            // A test cluster: durability is not what is under test, speed is welcome.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=300"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("postgres exited at start ({status}): {}", self.log());
                }
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("postgres did not accept connections within 30 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the server (fast shutdown: every session ends at once, new connections are
    /// refused) and wait until it is gone. [`PgCluster::restart`] brings it back.
    pub fn stop(&mut self) {
        self.shut_down("-INT");
    }

    /// Start it again after [`PgCluster::stop`], on the same port and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.run_server().await
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

impl PgCluster {
    /// Signal the postmaster (through its own pid: under runuser our child is runuser),
    /// wait until it exited, and reap our child.
    fn shut_down(&mut self, signal: &str) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args([signal, &pid]).status();
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

/// A CA, and a server certificate and key it signed (for 127.0.0.1 and localhost), made
/// with the `openssl` command; the key readable by the server's user only.
fn make_certificates(scratch: &Path, home: &Path, root: bool) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).current_dir(scratch).output().context("running `openssl` (apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=flowhost test CA"]);
    ca_args.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    run(&ca_args)?;
    let mut csr_args = vec!["req"];
    csr_args.extend(ec);
    csr_args.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    run(&csr_args)?;
    std::fs::write(scratch.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")?;
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext"])?;
    let (cert, key) = (home.join("server.crt"), home.join("server.key"));
    std::fs::copy(scratch.join("server.crt"), &cert)?;
    std::fs::copy(scratch.join("server.key"), &key)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    }
    if root {
        let status = Command::new("chown").args(["nobody:"]).arg(&cert).arg(&key).status().context("chown")?;
        if !status.success() {
            bail!("chown of the server key to nobody failed");
        }
    }
    Ok((cert, key, scratch.join("ca.crt")))
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // SIGQUIT: PostgreSQL's immediate shutdown (all backends end at once).
        self.shut_down("-QUIT");
    }
}
