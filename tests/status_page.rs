//! The status page in a real browser: Debian's chromedriver drives headless Chromium over the
//! W3C WebDriver protocol against a balancer that requires an admin token. The page must
//! show every listener, pool and backend with its state, ask for the token before its
//! buttons work, drain a backend on a click, show a change made through the API without
//! being reloaded, and fetch nothing beyond loopback. Its screenshot is kept in the
//! integration tests' temp dir (`status-page.png`). Without Chromium or chromedriver the
//! test is skipped, loudly, unless `SWITCHYARD_REQUIRE_TOOLS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "support/webdriver.rs"]
mod webdriver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::{get, post};
use common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use webdriver::{ChromeDriver, Session};

const TOKEN_ENV: &str = "SWITCHYARD_PAGE_TEST_TOKEN";
const TOKEN: &str = "page-test-token-0123456789";

/// A backend's row on the page.
fn row(pool: &str, backend: &str) -> String {
    format!(r#"[data-pool="{pool}"] [data-backend="{backend}"]"#)
}

/// Waits (up to [`LIMIT`]) until `script` run in the page returns `want`; panics with the
/// last answer.
async fn wait_page(page: &Session, what: &str, script: &str, want: Value) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let got = page.execute(script).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the page still says {got} after {LIMIT:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (up to [`LIMIT`]) until `GET /api/v1/status` gives the backend this admin state.
async fn wait_admin_state(admin: SocketAddr, pool: &str, backend: &str, want: &str) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let status = get(admin, "/api/v1/status").await.json();
        let state = status["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == pool)
            .flat_map(|p| p["backends"].as_array().into_iter().flatten())
            .find(|b| b["name"] == backend)
            .map(|b| b["admin_state"].clone());
        if state == Some(json!(want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pool}/{backend}: admin_state {state:?} after {LIMIT:?}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clicks what `css` finds, finding it again when the page re-rendered it in between.
async fn click(page: &Session, css: &str) {
    within(css, async {
        loop {
            let clicked = match page.find(css).await {
                Ok(element) => page.click(&element).await,
                Err(e) => Err(e),
            };
            match clicked {
                Ok(()) => return,
                Err(e)
                    if ["stale element reference", "no such element"]
                        .contains(&e.error.as_str()) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_headless_chromium_over_webdriver() {
    let Some((browser, driver)) = webdriver::tools() else {
        missing_tool(
            "status_page_in_headless_chromium_over_webdriver",
            "chromium or chromedriver is not on PATH (apt-get install chromium chromium-driver; \
             .ci/run installs them)",
        );
        return;
    };
    std::env::set_var(TOKEN_ENV, TOKEN);
    let backends = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let yaml = format!(
        "admin:\n  bind: 127.0.0.1:0\n  token_env: {TOKEN_ENV}\nlisteners:\n  - {{ name: postgres-write, bind: 127.0.0.1:0, pool: pg-write }}\n  - {{ name: cache, bind: 127.0.0.1:0, pool: cache, max_connections: 500 }}\n  - {{ name: tls, bind: 127.0.0.1:0, tls_passthrough: {{ routes: [{{ sni: [db.example.com], pool: pg-write }}] }} }}\n  - {{ name: dns, bind: 127.0.0.1:0, protocol: udp, pool: cache }}\npools:\n  - name: pg-write\n    balance: least_conn\n    health_check: {{ type: tcp, interval: 1h, timeout: 5s, initial_state: up }}\n    backends:\n      - {{ name: pg-1, address: \"{}\" }}\n      - {{ name: pg-2, address: \"{}\", weight: 2 }}\n  - name: cache\n    balance: maglev\n    max_fails: 1\n    fail_duration: 1h\n    backends:\n      - {{ name: cache-a, address: \"{}\" }}\n      - {{ name: cache-b, address: \"{}\" }}\n      - {{ name: cache-c, address: \"{}\" }}\n  - name: replicas\n    backends:\n      - {{ name: r-1, address: \"{}\" }}\n      - {{ name: r-2, address: \"{}\" }}\n",
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
        Some(TOKEN),
        r#"{"state":"drain"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post(
        admin,
        "/api/v1/pools/cache/backends/cache-b/state",
        Some(TOKEN),
        r#"{"state":"maint"}"#,
    )
    .await;
    assert_eq!(r.status, 200);

    let dir = tempfile::tempdir().unwrap();
    let driver = ChromeDriver::start(&driver, dir.path()).await;
    let page = driver
        .session(&browser, &dir.path().join("profile"), (1440, 1000))
        .await;
    page.goto(&format!("http://{admin}/")).await;
    wait_page(
        &page,
        "every backend shown",
        "return document.querySelectorAll('[data-backend]').length",
        json!(7),
    )
    .await;
    let rows = page
        .execute(
            "const all = (css, f) => [...document.querySelectorAll(css)].map(f);
             return {
               listeners: all('[data-listener]', (e) => e.dataset.listener),
               pools: all('[data-pool]', (e) => e.dataset.pool),
               backends: all('[data-backend]', (e) =>
                 [e.closest('[data-pool]').dataset.pool, e.dataset.backend, e.dataset.state].join(' ')),
             };",
        )
        .await;
    assert_eq!(
        rows,
        json!({
            "listeners": ["postgres-write", "cache", "tls", "dns"],
            "pools": ["pg-write", "cache", "replicas"],
            "backends": [
                "pg-write pg-1 up", "pg-write pg-2 drain",
                "cache cache-a up", "cache cache-b maint", "cache cache-c down",
                "replicas r-1 up", "replicas r-2 standby",
            ],
        })
    );
    let dom = page
        .execute("return document.documentElement.outerHTML")
        .await
        .as_str()
        .unwrap()
        .to_string();
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
    // The UDP listener (no `connections` in the status, flows instead) has its flow line, and
    // the summary counts its flows apart from the connections.
    assert!(
        dom.contains(r#"<tr class="udp">"#),
        "page lacks the UDP listener's flow line:\n{dom}"
    );
    assert!(
        dom.contains(" udp flows"),
        "page lacks the UDP flow count:\n{dom}"
    );
    // The page asks for the token and keeps every button off until it has it.
    let locked = page
        .execute(
            "const buttons = [...document.querySelectorAll('button[data-action]')];
             return [document.getElementById('token') !== null, buttons.length,
                     buttons.every((b) => b.disabled),
                     buttons.every((b) => b.title === 'Enter the admin token to change state')];",
        )
        .await;
    assert_eq!(locked, json!([true, 21, true, true]));
    // Everything from here on happens in this one page load.
    page.execute("window.sameLoad = true; return null").await;
    let input = page
        .find("#token")
        .await
        .unwrap_or_else(|e| panic!("token input: {e}"));
    page.send_keys(&input, &format!("{TOKEN}\u{E007}"))
        .await
        .unwrap_or_else(|e| panic!("type the token: {e}"));
    let drain = format!(r#"{} button[data-action="drain"]"#, row("cache", "cache-a"));
    wait_page(
        &page,
        "drain button enabled once the token is given",
        &format!("return document.querySelector('{drain}').disabled"),
        json!(false),
    )
    .await;
    click(&page, &drain).await;
    wait_admin_state(admin, "cache", "cache-a", "drain").await;
    wait_page(
        &page,
        "cache-a drained on the page",
        &format!(
            "return document.querySelector('{}').dataset.adminState",
            row("cache", "cache-a")
        ),
        json!("drain"),
    )
    .await;

    // A change made elsewhere shows up by itself: the refresh after the click is done, and
    // nothing but the page's timer fetches the status again.
    let r = post(
        admin,
        "/api/v1/pools/pg-write/backends/pg-1/state",
        Some(TOKEN),
        r#"{"state":"maint"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    wait_page(
        &page,
        "pg-1 in maintenance without a reload",
        &format!(
            "const r = document.querySelector('{}');
             return [r.dataset.adminState, r.dataset.state, window.sameLoad === true];",
            row("pg-write", "pg-1")
        ),
        json!(["maint", "maint", true]),
    )
    .await;

    // Every request the page made went to loopback (the page's own admin address).
    let requests = page
        .execute(
            "return performance.getEntriesByType('navigation')
               .concat(performance.getEntriesByType('resource'))
               .map((e) => [e.name, new URL(e.name).host]);",
        )
        .await;
    let requests = requests.as_array().unwrap();
    assert!(
        requests
            .iter()
            .any(|r| r[0].as_str().unwrap().ends_with("/api/v1/status")),
        "no status fetch among {requests:?}"
    );
    for r in requests {
        let host: SocketAddr = r[1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("a request to a named host: {r}"));
        assert!(host.ip().is_loopback(), "a request beyond loopback: {r}");
    }

    let png = page.screenshot().await;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&shot, &png).unwrap();
    let (width, height) = webdriver::png_size(&png);
    assert!(
        (800..=4000).contains(&width) && (400..=4000).contains(&height),
        "screenshot of {width}x{height}"
    );
    assert!(
        png.len() > 10_000,
        "a blank screenshot: {} bytes",
        png.len()
    );
    eprintln!(
        "status page screenshot ({width}x{height}): {}",
        shot.display()
    );
    page.quit().await;
    drop(driver);
    drop(held);
}
