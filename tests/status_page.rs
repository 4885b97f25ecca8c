//! The status page in a real browser: headless Chromium loads `/`, runs its script against
//! the live admin API, and the rendered DOM must show every listener, pool and backend with
//! its state. A screenshot is kept in the target directory (`status-page.png`).
//! Skipped, loudly, where Chromium is not installed (CI installs Debian's `chromium`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::post;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|p| p.is_file())
}

/// Runs Chromium headless with `args` on `url`; returns stdout. Bounded in time; the child is
/// killed by its PID if it overruns.
fn run_chromium(binary: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { stdout }, &mut out).ok();
        out
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().expect("reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!(
            "\n!!! SKIPPED status_page_renders_in_headless_chromium: no chromium on PATH \
             (apt-get install chromium; .ci/run installs it) !!!\n"
        );
        return;
    };
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\nlisteners:\n  - {{ name: postgres-write, bind: 127.0.0.1:0, pool: pg-write }}\n  - {{ name: cache, bind: 127.0.0.1:0, pool: cache, max_connections: 500 }}\n  - {{ name: tls, bind: 127.0.0.1:0, tls_passthrough: {{ routes: [{{ sni: [db.example.com], pool: pg-write }}] }} }}\npools:\n  - name: pg-write\n    balance: least_conn\n    health_check: {{ type: tcp, interval: 1h, timeout: 5s, initial_state: up }}\n    backends:\n      - {{ name: pg-1, address: \"{}\" }}\n      - {{ name: pg-2, address: \"{}\", weight: 2 }}\n  - name: cache\n    balance: maglev\n    max_fails: 1\n    fail_duration: 1h\n    backends:\n      - {{ name: cache-a, address: \"{}\" }}\n      - {{ name: cache-b, address: \"{}\" }}\n      - {{ name: cache-c, address: \"{}\" }}\n  - name: replicas\n    backends:\n      - {{ name: r-1, address: \"{}\" }}\n      - {{ name: r-2, address: \"{}\" }}\n",
        backends[0].addr,
        backends[1].addr,
        backends[2].addr,
        backends[3].addr,
        refused_addr(),
        backends[2].addr,
        backends[3].addr,
    );
    let lb = Balancer::start(&yaml).await;
    let admin = lb.admin.unwrap();
    // pg-write is checked (first check at startup, shown as the last check).
    for b in ["pg-1", "pg-2"] {
        let state = lb.shared.backend_state("pg-write", b).unwrap();
        within("first check", async {
            while state.last_check().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
    // r-2 is a standby, as a replica is in a primary-only pool: healthy, not in rotation.
    lb.shared
        .backend_state("replicas", "r-2")
        .unwrap()
        .set_status(switchyard::backend::HealthStatus::STANDBY);
    // Some traffic, one drained backend, one in maintenance, one down (refused connects).
    let mut held = Vec::new();
    for _ in 0..5 {
        let (_, mut s) = greet(TcpStream::connect(lb.addr("postgres-write")).await.unwrap()).await;
        s.get_mut().write_all(&[7u8; 40_000]).await.unwrap();
        held.push(s);
    }
    for i in 0..24 {
        let s = connect_from(&format!("127.0.0.{}", 10 + i), lb.addr("cache")).await;
        held.push(tokio::io::BufReader::new(s));
    }
    let r = post(
        admin,
        "/api/v1/pools/pg-write/backends/pg-2/state",
        None,
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post(
        admin,
        "/api/v1/pools/cache/backends/cache-b/state",
        None,
        r#"{"state":"maint"}"#,
    )
    .await;
    assert_eq!(r.status, 200);

    let url = format!("http://{admin}/");
    let profile = tempfile::tempdir().unwrap();
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let (dom, shot) = tokio::task::spawn_blocking(move || {
        let dom = run_chromium(
            &browser,
            profile.path(),
            &["--virtual-time-budget=5000", "--dump-dom"],
            &url,
        );
        run_chromium(
            &browser,
            profile.path(),
            &[
                "--virtual-time-budget=5000",
                "--window-size=1440,1000",
                &format!("--screenshot={}", shot.display()),
            ],
            &url,
        );
        (dom, shot)
    })
    .await
    .unwrap();

    for text in [
        "postgres-write",
        "cache",
        "pg-write",
        "pg-1",
        "pg-2",
        "cache-a",
        "cache-b",
        "cache-c",
        "least_conn",
        "maglev",
        "Reload config",
    ] {
        assert!(dom.contains(text), "page lacks {text:?}:\n{dom}");
    }
    for state in ["pill up", "pill drain", "pill maint", "pill down"] {
        assert!(dom.contains(state), "page lacks a {state:?} pill:\n{dom}");
    }
    // A pool whose only other backend is a standby is healthy, not degraded.
    assert!(
        dom.contains("pill standby"),
        "page lacks a standby pill:\n{dom}"
    );
    let replicas = dom
        .split("data-pool=\"replicas\"")
        .nth(1)
        .and_then(|rest| rest.split("</h2>").next())
        .unwrap_or_else(|| panic!("no replicas pool on the page:\n{dom}"));
    assert!(
        replicas.contains(r#"<span class="pill up">healthy</span>"#),
        "a pool with a standby is shown as {replicas}"
    );
    // The last active check, in its own state's colour.
    assert!(
        dom.contains(r#"<span class="pill up">up</span><span class="muted"> "#),
        "page lacks a passing last check:\n{dom}"
    );
    // The TLS listener shows its routes by SNI and that unrouted names are closed.
    for text in [
        "tls sni",
        "db.example.com</span> → pg-write",
        "default → closed",
    ] {
        assert!(dom.contains(text), "page lacks {text:?}:\n{dom}");
    }
    assert!(
        dom.contains("updated "),
        "the page fetched the status:\n{dom}"
    );
    // With a token required, the page asks for it and keeps the buttons off until then.
    std::env::set_var("SWITCHYARD_PAGE_TEST_TOKEN", "page-test-token-0123456789");
    let locked = Balancer::start(&format!(
        "admin:\n  bind: 127.0.0.1:0\n  token_env: SWITCHYARD_PAGE_TEST_TOKEN\nlisteners:\n  - {{ name: l, bind: 127.0.0.1:0, pool: p }}\npools:\n  - name: p\n    backends: [{{ name: only, address: \"{}\" }}]\n",
        backends[0].addr
    ))
    .await;
    let url = format!("http://{}/", locked.admin.unwrap());
    let browser = chromium().unwrap();
    let locked_shot = shot.with_file_name("status-page-token.png");
    let profile = tempfile::tempdir().unwrap();
    let locked_dom = tokio::task::spawn_blocking({
        let locked_shot = locked_shot.clone();
        move || {
            run_chromium(
                &browser,
                profile.path(),
                &[
                    "--virtual-time-budget=5000",
                    "--window-size=1280,520",
                    &format!("--screenshot={}", locked_shot.display()),
                ],
                &url,
            );
            run_chromium(
                &browser,
                profile.path(),
                &["--virtual-time-budget=5000", "--dump-dom"],
                &url,
            )
        }
    })
    .await
    .unwrap();
    assert!(
        locked_dom.contains("placeholder=\"admin token\""),
        "{locked_dom}"
    );
    assert!(locked_dom.contains("Enter the admin token to change state"));
    assert!(std::fs::metadata(&locked_shot).is_ok());

    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    assert!(png.len() > 10_000, "screenshot has content");
    eprintln!("status page screenshot: {}", shot.display());
    drop(held);
}
