//! A PostgreSQL server of the tests' own: `initdb` and `pg_ctl` (Debian's `postgresql` package)
//! in a temporary directory, on a free loopback port, run as an unprivileged user when the tests
//! run as root (PostgreSQL refuses to run as root). Nothing needs to be running beforehand, and
//! the server is stopped when the value is dropped.
//!
//! For tests only: the server trusts every local connection and runs with `fsync = off` (a
//! server process that dies loses nothing with it; only the machine crashing would).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// The user the tests' server runs as when the tests run as root.
const UNPRIVILEGED_USER: &str = "nobody";

/// A running test server.
pub struct TestServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some` when the server runs as another user than the tests.
    user: Option<(&'static str, u32, u32)>,
    /// Whether it speaks TLS (and nothing else over TCP).
    tls: bool,
}

/// Where `initdb` and `pg_ctl` are: Debian keeps them in `/usr/lib/postgresql/<version>/bin`.
fn find_bin() -> Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|error| {
            format!(
                "PostgreSQL is not installed (/usr/lib/postgresql: {error}); \
                 scripts/setup.sh installs Debian's postgresql package"
            )
        })?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no PostgreSQL server under /usr/lib/postgresql".to_string())
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    Ok(listener
        .local_addr()
        .map_err(|error| error.to_string())?
        .port())
}

/// The uid and gid of `user`, from `/etc/passwd`.
fn ids_of(user: &str) -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|error| error.to_string())?;
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&user) && fields.len() > 3)
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .ok_or_else(|| format!("no user {user} to run PostgreSQL as"))
}

fn checked(output: std::io::Result<Output>, what: &str) -> Result<Output, String> {
    let output = output.map_err(|error| format!("{what}: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

impl TestServer {
    /// Creates a cluster and starts it.
    pub fn start() -> Result<TestServer, String> {
        TestServer::start_with(None)
    }

    /// Creates a cluster that takes TCP connections over TLS only, with the certificate and key
    /// of these PEM files, and starts it.
    pub fn start_tls(certificate: &Path, key: &Path) -> Result<TestServer, String> {
        TestServer::start_with(Some((certificate, key)))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Result<TestServer, String> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("stipend-pg-")
            .tempdir()
            .map_err(|error| error.to_string())?;
        let user = if rustix::process::geteuid().is_root() {
            let (uid, gid) = ids_of(UNPRIVILEGED_USER)?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|error| format!("cannot hand {} over: {error}", dir.path().display()))?;
            Some((UNPRIVILEGED_USER, uid, gid))
        } else {
            None
        };
        let server = TestServer {
            port: free_port()?,
            bin,
            dir,
            user,
            tls: tls.is_some(),
        };
        checked(
            server
                .command("initdb")
                .arg("-D")
                .arg(server.data())
                .args(["-U", "stipend", "--auth=trust", "-E", "UTF8", "--no-sync"])
                .output(),
            "initdb",
        )?;
        if let Some((certificate, key)) = tls {
            server.install_tls(certificate, key)?;
        }
        server.pg_ctl_start()?;
        server.stop_when_the_tests_end()?;
        Ok(server)
    }

    /// A server held in a `static` is never dropped, and a test process may be killed: a small
    /// watcher stops the server and removes its directory once the test process is gone,
    /// whichever way it went.
    fn stop_when_the_tests_end(&self) -> Result<(), String> {
        let stop = self.command("pg_ctl");
        let mut line = format!("{:?}", stop.get_program());
        for arg in stop.get_args() {
            line.push(' ');
            line.push_str(&format!("{arg:?}"));
        }
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; {line} -D {data:?} -m immediate -w stop; \
             rm -rf {dir:?}",
            pid = std::process::id(),
            data = self.data(),
            dir = self.dir.path(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot watch the test server: {error}"))?;
        Ok(())
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of the server's, run as its user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.user {
            Some((_, uid, gid)) => {
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    /// The server's certificate and key in its data directory (the key readable by the server's
    /// user alone, as PostgreSQL insists), and a `pg_hba.conf` that refuses TCP without TLS.
    fn install_tls(&self, certificate: &Path, key: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        for (from, name) in [(certificate, "server.crt"), (key, "server.key")] {
            let to = data.join(name);
            std::fs::copy(from, &to)
                .map_err(|error| format!("cannot copy {}: {error}", from.display()))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(|error| error.to_string())?;
            if let Some((_, uid, gid)) = self.user {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                    .map_err(|error| error.to_string())?;
            }
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .map_err(|error| error.to_string())
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200{}",
            self.port,
            self.dir.path().display(),
            if self.tls { " -c ssl=on" } else { "" }
        );
        checked(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-o", &options, "-l"])
                .arg(self.dir.path().join("log"))
                .args(["-w", "-t", "60", "start"])
                .output(),
            "pg_ctl start",
        )?;
        Ok(())
    }

    /// Restarts the server at once, as a crash would: `pg_ctl restart -m immediate`.
    pub fn restart_immediate(&self) -> Result<(), String> {
        checked(
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"])
                .output(),
            "pg_ctl stop",
        )?;
        self.pg_ctl_start()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of one of its databases.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://stipend@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh database with a name of its own, and returns its URL.
    pub fn fresh_database(&self) -> Result<String, String> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        checked(
            Command::new("psql")
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    &self.url("postgres"),
                ])
                .args(["-c", &format!("CREATE DATABASE {name}")])
                .output(),
            "CREATE DATABASE",
        )?;
        Ok(self.url(&name))
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The directory the server lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
