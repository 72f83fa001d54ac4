//! A small WebDriver client for the dashboard's browser test: headless Chromium through chromedriver
//! (Debian's `chromium` and `chromium-driver`, which `scripts/services.sh up` installs). Only the
//! commands the test uses: open a page, find elements, click, read text, run a script, screenshot.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use super::web::request;

/// The key WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where a program is, from `$var` or the first of `names` on the `PATH`.
fn program(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Chromium and chromedriver. A missing browser fails the test: it never skips.
pub fn require_browser() -> (PathBuf, PathBuf) {
    let chromium = program("MACHINERY_TEST_CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = program("MACHINERY_TEST_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(chromium), Some(driver)) => (chromium, driver),
        (chromium, driver) => panic!(
            "the browser test needs Chromium and chromedriver (found chromium: {chromium:?}, chromedriver: \
             {driver:?}); run scripts/services.sh up, which installs Debian's chromium and chromium-driver"
        ),
    }
}

/// A free port on 127.0.0.1 (the system picks it; nothing listens on it once this returns).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A chromedriver process and one browser session in it; both end when dropped (or at [`quit`]).
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session.
    pub async fn start() -> Browser {
        let (chromium, driver_path) = require_browser();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that the browsers it starts end with it (see Drop).
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver_path.display()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not listen on {addr} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("machinery-web-test-{port}"));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1200,860", "--hide-scrollbars", "--no-first-run",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        let created = browser.call("POST", "/session", Some(capabilities)).await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {created}"))
            .to_owned();
        browser
    }

    /// One WebDriver command; panics with the driver's error.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("Content-Type", "application/json")];
        if method == "GET" || method == "DELETE" {
            headers.clear();
        }
        let response = request(&self.addr, method, path, &headers, body.as_bytes()).await;
        let value: Value = serde_json::from_str(&response.body).unwrap_or_else(|e| {
            panic!(
                "chromedriver answered {method} {path} with non-JSON ({e}): {}",
                response.body
            )
        });
        assert_eq!(response.status, 200, "{method} {path}: {value}");
        value["value"].clone()
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", &self.path("/url"), Some(json!({"url": url})))
            .await;
    }

    /// The elements matching `css` now.
    pub async fn find_all(&self, css: &str) -> Vec<String> {
        let found = self
            .call(
                "POST",
                &self.path("/elements"),
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first element matching `css`, waiting up to `timeout` for one.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(first) = self.find_all(css).await.into_iter().next() {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element {css:?} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, element: &str) {
        self.call(
            "POST",
            &self.path(&format!("/element/{element}/click")),
            Some(json!({})),
        )
        .await;
    }

    pub async fn text(&self, element: &str) -> String {
        self.call("GET", &self.path(&format!("/element/{element}/text")), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the first element matching `css` shows `text` (read as its `textContent`, so that
    /// the live refresh swapping the page in between does no harm).
    pub async fn wait_for_text(&self, css: &str, text: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let read = "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;";
        loop {
            let now = self.execute(read, json!([css])).await;
            if now.as_str() == Some(text) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let html = self
                    .execute(
                        "const e = document.querySelector(arguments[0]); return e ? e.outerHTML : document.body.outerHTML;",
                        json!([css]),
                    )
                    .await;
                panic!("{css:?} did not show {text:?} within {timeout:?} (last: {now}); the page has {html}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Like [`call`] without a body, but an error (a stale element) is `null`, not a panic.
    async fn call_lenient(&self, method: &str, path: &str) -> Value {
        let response = request(&self.addr, method, path, &[], b"").await;
        if response.status != 200 {
            return Value::Null;
        }
        serde_json::from_str::<Value>(&response.body)
            .map(|v| v["value"].clone())
            .unwrap_or(Value::Null)
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns its value.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.path("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Writes a PNG of the window to `path` (creating its directory).
    pub async fn screenshot(&self, path: &Path) {
        let data = self.call("GET", &self.path("/screenshot"), None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("create the screenshot directory");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Ends the session and chromedriver.
    pub async fn quit(self) {
        let path = self.path("");
        let _ = request(&self.addr, "DELETE", &path, &[], b"").await;
    }
}

impl Drop for Browser {
    /// Ends chromedriver and every browser it started (its process group), even when a test panics.
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
