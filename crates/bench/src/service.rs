//! The service under test: the real binary (`serve`, or another role) as a child process
//! configured only through environment variables, killed on every exit path (see
//! [`Service`]'s `Drop`).

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::time::Instant;

/// A running `invite-worker serve` (or `api`, `work`) child. Dropping it kills the
/// process.
pub struct Service {
    child: Option<Child>,
    pub pid: u32,
    pub base: String,
    pub log: PathBuf,
}

impl Service {
    /// Starts `exe serve` in `dir` (so no `./worker.toml` applies) with the bench's
    /// environment minus every `INVITES_*`, `DATABASE_URL` and `RUST_LOG` (the service
    /// logs at its production default), plus `env`. Its output goes to `dir/service.log`.
    pub fn spawn(
        exe: &Path,
        dir: &Path,
        env: &[(String, String)],
        port: u16,
    ) -> anyhow::Result<Self> {
        Self::spawn_role(exe, dir, env, port, "serve")
    }

    /// [`Service::spawn`] with another subcommand than `serve` (`api`: HTTP only).
    pub fn spawn_role(
        exe: &Path,
        dir: &Path,
        env: &[(String, String)],
        port: u16,
        role: &str,
    ) -> anyhow::Result<Self> {
        let log = dir.join("service.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        // Run through a symlink of its own name: the very same file, but a process name
        // and command line that no `pkill invite-worker` elsewhere on the machine matches.
        let link = dir.join("iw-bench-under-test");
        #[cfg(unix)]
        let program = match std::os::unix::fs::symlink(exe, &link) {
            Ok(()) => link,
            Err(_) => exe.to_path_buf(),
        };
        #[cfg(not(unix))]
        let program = exe.to_path_buf();
        let mut cmd = Command::new(&program);
        cmd.arg(role)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("INVITES_") || k == "DATABASE_URL" || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} {role}", exe.display()))?;
        Ok(Self {
            pid: child.id(),
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    /// Fails when the process has exited, naming its status and the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("the service was stopped");
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "the service exited ({status}); the end of its log:\n{}",
                log_tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// Waits until `GET /readyz` answers 200 (database reachable and migrated).
    pub async fn wait_ready(
        &mut self,
        client: &reqwest::Client,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        let url = format!("{}/readyz", self.base);
        loop {
            self.check_alive()?;
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "the service did not become ready within {} s; the end of its log:\n{}",
                    timeout.as_secs(),
                    log_tail(&self.log, 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// CPU time used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> Option<u64> {
        process_cpu_ticks(&format!("/proc/{}/stat", self.pid))
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a log file (empty when unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// (WARN lines, ERROR lines) of a tracing fmt log.
pub fn log_levels(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let strip = |l: &str| -> String {
        // Drop ANSI colour codes so " WARN " matches with or without them.
        let mut out = String::with_capacity(l.len());
        let mut in_escape = false;
        for c in l.chars() {
            match (in_escape, c) {
                (false, '\u{1b}') => in_escape = true,
                (true, 'm') => in_escape = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    let mut warn = 0;
    let mut error = 0;
    for line in text.lines() {
        let line = strip(line);
        if line.contains(" WARN ") {
            warn += 1;
        } else if line.contains(" ERROR ") {
            error += 1;
        }
    }
    (warn, error)
}

/// utime + stime of `/proc/<pid>/stat` (fields 14 and 15), in clock ticks.
pub fn process_cpu_ticks(stat_path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The command name (field 2) may contain spaces: count fields after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, idle) clock ticks of the whole machine from `/proc/stat`.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is included in user).
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    let idle = get(3) + get(4);
    Some((busy, idle))
}

/// Clock ticks per second of `/proc` CPU figures (USER_HZ: 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}
