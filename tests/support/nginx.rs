//! A real nginx for the PROXY protocol tests: run in the foreground from a temp dir with
//! the given `http`/`stream` blocks, stopped by its PID when dropped. `start` returns None
//! (after saying so loudly) when nginx or its stream module is not installed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NGINX: &str = "/usr/sbin/nginx";
pub const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

pub struct Nginx {
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// Starts nginx with `blocks` (what goes after `events`) and waits until it accepts on
    /// every port in `ports`. `{dir}` in `blocks` is replaced by its temp dir.
    pub fn start(blocks: &str, ports: &[u16]) -> Option<Nginx> {
        if !Path::new(NGINX).exists() {
            crate::common::missing_tool(
                "nginx as a PROXY protocol consumer",
                &format!("nginx is not installed ({NGINX})"),
            );
            return None;
        }
        let stream = blocks.contains("stream {");
        let load = if stream {
            if !Path::new(STREAM_MODULE).exists() {
                crate::common::missing_tool(
                    "nginx stream as a PROXY protocol consumer",
                    &format!("the nginx stream module is not installed ({STREAM_MODULE}); install libnginx-mod-stream"),
                );
                return None;
            }
            format!("load_module {STREAM_MODULE};\n")
        } else {
            String::new()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let conf = format!(
            "{load}daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{ worker_connections 64; }}\n{}",
            blocks.replace("{dir}", &d)
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        // Each readiness probe sends a PROXY header, so a proxy_protocol listener logs no
        // broken header for it (and other listeners just see a bad request).
        let ready = |port: u16| {
            use std::io::Write;
            std::net::TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| s.write_all(b"PROXY UNKNOWN\r\n"))
                .is_ok()
        };
        for port in ports {
            while !ready(*port) {
                if let Ok(Some(status)) = nginx.child.try_wait() {
                    panic!("nginx exited ({status}):\n{}", nginx.error_log());
                }
                assert!(
                    Instant::now() < deadline,
                    "nginx not listening on {port}:\n{}",
                    nginx.error_log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(nginx)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn error_log(&self) -> String {
        self.log("error.log")
    }

    /// A log file in its dir (missing: empty). Lossy: nginx quotes a broken header's raw
    /// bytes, which need not be UTF-8.
    pub fn log(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.path(name)).unwrap_or_default()).into_owned()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // Stopped by its own PID (the child handle), never by name.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
