//! Headless Chromium driven through Debian's `chromedriver` over the W3C WebDriver HTTP
//! protocol, with the test HTTP client. The driver runs on a free loopback port in its own
//! process group (the browsers it starts join it); dropping [`ChromeDriver`] kills that group
//! by the driver's PID, also when the test panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::http::request;
use crate::common::{refused_addr, within};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// The browser and its driver, when both are installed.
pub fn tools() -> Option<(PathBuf, PathBuf)> {
    let browser = on_path(&["chromium", "chromium-browser"])?;
    let driver = on_path(&["chromedriver"])?;
    Some((browser, driver))
}

pub struct ChromeDriver {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl ChromeDriver {
    /// Starts `driver` on a free loopback port, logging to `dir`, and waits until it is ready.
    /// The port is found free and then given to chromedriver, so another process may take it
    /// in between: a driver that exits before it is ready is started again on a new port.
    pub async fn start(driver: &Path, dir: &Path) -> ChromeDriver {
        let log = dir.join("chromedriver.log");
        for _attempt in 0..3 {
            let addr = refused_addr();
            let child = Command::new(driver)
                .arg(format!("--port={}", addr.port()))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("start chromedriver");
            let mut driver = ChromeDriver {
                child,
                addr,
                log: log.clone(),
            };
            let ready = within("chromedriver ready", async {
                loop {
                    if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
                        drop(s);
                        let r = request(addr, "GET", "/status", &[], "").await;
                        if r.json()["value"]["ready"] == true {
                            return true;
                        }
                    }
                    if matches!(driver.child.try_wait(), Ok(Some(_))) {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if ready {
                return driver;
            }
        }
        panic!(
            "chromedriver exited before it was ready, three times; see {}",
            log.display()
        );
    }

    /// A new headless session of `browser` with a fresh profile in `profile`.
    pub async fn session(&self, browser: &Path, profile: &Path, window: (u32, u32)) -> Session {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ]
        .map(String::from)
        .into_iter()
        .chain([
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={},{}", window.0, window.1),
        ])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": browser, "args": args},
        }}});
        let r = request(
            self.addr,
            "POST",
            "/session",
            &[("Content-Type", "application/json")],
            &caps.to_string(),
        )
        .await;
        let v = r.json();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session ({}): {v}\n{}", r.status, self.log()))
            .to_string();
        Session {
            driver: self.addr,
            id,
        }
    }

    /// The driver's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group's id is the driver's PID, still ours until it is reaped below.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A WebDriver error: its `error` code (such as "stale element reference") and message.
#[derive(Debug)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

pub struct Session {
    driver: SocketAddr,
    id: String,
}

impl Session {
    /// Sends one command; returns its `value`, or the error the driver answered.
    pub async fn command(
        &self,
        method: &str,
        path: &str,
        body: Value,
    ) -> Result<Value, WebDriverError> {
        let path = format!("/session/{}{path}", self.id);
        let body = if method == "POST" {
            body.to_string()
        } else {
            String::new()
        };
        let r = request(
            self.driver,
            method,
            &path,
            &[("Content-Type", "application/json")],
            &body,
        )
        .await;
        let mut v = r.json();
        let value = v["value"].take();
        if r.status == 200 {
            return Ok(value);
        }
        Err(WebDriverError {
            error: value["error"].as_str().unwrap_or("?").to_string(),
            message: value["message"].as_str().unwrap_or("").to_string(),
        })
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        self.command(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.ok("POST", "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    pub async fn execute(&self, script: &str) -> Value {
        self.ok(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// The first element matching the CSS selector.
    pub async fn find(&self, css: &str) -> Result<String, WebDriverError> {
        let v = self
            .command(
                "POST",
                "/element",
                json!({ "using": "css selector", "value": css }),
            )
            .await?;
        Ok(v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element id in {v}"))
            .to_string())
    }

    pub async fn click(&self, element: &str) -> Result<(), WebDriverError> {
        self.command("POST", &format!("/element/{element}/click"), json!({}))
            .await
            .map(drop)
    }

    /// Types `text` into the element (`\u{E007}` is the Enter key).
    pub async fn send_keys(&self, element: &str, text: &str) -> Result<(), WebDriverError> {
        self.command(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await
        .map(drop)
    }

    /// A screenshot of the viewport, as PNG bytes.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self.ok("GET", "/screenshot", Value::Null).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64 screenshot"))
            .expect("screenshot decodes from base64")
    }

    /// Ends the session; the driver closes the browser.
    pub async fn quit(self) {
        request(
            self.driver,
            "DELETE",
            &format!("/session/{}", self.id),
            &[],
            "",
        )
        .await;
    }
}

/// The width and height of a PNG, after checking its signature, that every chunk's CRC
/// matches, that image data follows the header and that it ends with IEND.
pub fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "no PNG signature");
    let mut rest = &png[8..];
    let mut size = None;
    let mut data = 0;
    loop {
        assert!(rest.len() >= 12, "PNG truncated");
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(rest.len() >= 12 + len, "PNG chunk truncated");
        let (kind, body) = (&rest[4..8], &rest[8..8 + len]);
        let crc = u32::from_be_bytes(rest[8 + len..12 + len].try_into().unwrap());
        assert_eq!(
            crc32fast::hash(&rest[4..8 + len]),
            crc,
            "bad CRC in PNG chunk {}",
            String::from_utf8_lossy(kind)
        );
        match kind {
            b"IHDR" => {
                let w = u32::from_be_bytes(body[..4].try_into().unwrap());
                let h = u32::from_be_bytes(body[4..8].try_into().unwrap());
                size = Some((w, h));
            }
            b"IDAT" => data += len,
            b"IEND" => break,
            _ => {}
        }
        rest = &rest[12 + len..];
    }
    assert!(data > 0, "PNG without image data");
    size.expect("PNG without IHDR")
}
