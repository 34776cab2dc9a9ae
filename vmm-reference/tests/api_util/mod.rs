//! Helpers for the API tests: a `kiln` (or `firecracker`-named) process serving its API on a
//! socket in a scratch directory, optionally confined to its own mount and network namespace
//! with everything read-only but that directory, and a tiny HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A fresh scratch directory for one test (removed by [`Scratch`]'s drop).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("kiln-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bundled guest as a file in `dir`.
pub fn guest(dir: &Path) -> PathBuf {
    let p = dir.join("guest.elf");
    std::fs::write(&p, kiln::guest::ELF).expect("write guest");
    p
}

/// Boot arguments for the bundled guest booted from a file.
pub fn guest_args(scenarios: &str, cpus: u32, mem_mib: u64) -> String {
    format!(
        "console=ttyS0 kiln.test={scenarios} kiln.layout=kiln kiln.mem={} kiln.cpus={cpus}",
        mem_mib << 20
    )
}

/// A `firecracker` symlink to the kiln binary, in `dir`.
pub fn firecracker_link(dir: &Path) -> PathBuf {
    let link = dir.join("firecracker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kiln"), &link).expect("symlink");
    link
}

/// A running kiln with its API socket.
pub struct Kiln {
    pub child: Child,
    /// The guest console's input (with [`Launch::stdin`]).
    pub stdin: Option<std::process::ChildStdin>,
    pub sock: PathBuf,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn pump(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .expect("output lock")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

/// How a kiln process is started.
pub struct Launch<'a> {
    /// The program (the kiln binary, or a `firecracker` symlink to it).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Run it in its own mount and network namespace, everything read-only but this dir.
    pub confine_to: Option<&'a Path>,
    /// Pipe its stdin (the guest console with the default serial).
    pub stdin: bool,
}

impl<'a> Launch<'a> {
    pub fn kiln(args: &[&str]) -> Self {
        Launch {
            program: PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
            args: args.iter().map(|s| s.to_string()).collect(),
            confine_to: None,
            stdin: false,
        }
    }

    pub fn command(&self) -> Command {
        match self.confine_to {
            None => {
                let mut c = Command::new(&self.program);
                c.args(&self.args);
                c
            }
            Some(dir) => confined(dir, &self.program, &self.args),
        }
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `program args` in new mount and network namespaces where every mount is read-only except
/// `dir` (bind-mounted over itself first, so it stays writable).
pub fn confined(dir: &Path, program: &Path, args: &[String]) -> Command {
    let d = sh_quote(&dir.display().to_string());
    let mut exec = format!("exec {}", sh_quote(&program.display().to_string()));
    for a in args {
        exec.push(' ');
        exec.push_str(&sh_quote(a));
    }
    // Mount points with odd characters (\040 escapes) are skipped by the loop; every
    // ordinary one, / included, becomes read-only in this namespace only.
    let script = format!(
        "set -e; mount --make-rprivate /; mount --bind {d} {d}; \
         for m in $(awk '{{print $2}}' /proc/self/mounts | sort -u); do \
           [ \"$m\" = {d} ] && continue; \
           mount -o remount,bind,ro \"$m\" 2>/dev/null || true; \
         done; {exec}"
    );
    let mut c = Command::new("unshare");
    c.args(["--mount", "--net", "--", "sh", "-c", &script]);
    c
}

impl Kiln {
    /// Starts `launch` (which must serve its API at `sock`) and waits for the socket.
    pub fn start(launch: Launch<'_>, sock: &Path) -> Kiln {
        let mut child = launch
            .command()
            .stdin(if launch.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let stdout = pump(child.stdout.take().expect("stdout"));
        let stderr = pump(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        let mut k = Kiln {
            child,
            stdin,
            sock: sock.to_path_buf(),
            stdout,
            stderr,
        };
        let t0 = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if let Ok(Some(st)) = k.child.try_wait() {
                panic!("kiln exited before serving its API: {st}\n{}", k.output());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no API socket after 20 s\n{}",
                k.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        k
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("output lock").clone()
    }

    pub fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().expect("output lock"),
            self.stderr.lock().expect("output lock")
        )
    }

    /// One request on a fresh connection.
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut s = UnixStream::connect(&self.sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        send(&mut s, method, path, body);
        read_response(&mut s).unwrap_or_else(|| panic!("no response to {method} {path}"))
    }

    /// A request that must succeed with 204.
    pub fn ok(&self, method: &str, path: &str, body: &str) {
        let (code, text) = self.req(method, path, Some(body));
        assert_eq!(
            code,
            204,
            "{method} {path} {body}: {text}\n{}",
            self.output()
        );
        assert!(text.is_empty(), "204 with a body: {text}");
    }

    /// A request that must fail with 400; returns the fault message.
    pub fn fault(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let (code, text) = self.req(method, path, body);
        assert_eq!(code, 400, "{method} {path} {body:?}: {text}");
        fault_message(&text)
    }

    /// A GET that must succeed; the JSON body.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (code, text) = self.req("GET", path, None);
        assert_eq!(code, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// Waits until stdout contains `needle`.
    pub fn wait_stdout(&self, needle: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.stdout.lock().expect("output lock").contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the pumps drain.
                std::thread::sleep(Duration::from_millis(50));
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn send(s: &mut UnixStream, method: &str, path: &str, body: Option<&str>) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
}

/// Reads one response: (status, body). `None` if the connection closed first.
pub fn read_response(s: &mut UnixStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).to_string()))
}

/// The `fault_message` of an error body (panics unless it is one).
pub fn fault_message(text: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("error body not JSON ({e}): {text}"));
    let o = v.as_object().expect("error body is an object");
    assert_eq!(o.len(), 1, "only fault_message: {text}");
    o["fault_message"]
        .as_str()
        .expect("fault_message is a string")
        .to_string()
}

pub const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
pub const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";
