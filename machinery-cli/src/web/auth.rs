//! Who may use the dashboard, and how actions are protected.
//!
//! - Without a token the server listens on loopback only (`serve` refuses anything else), and every
//!   request must name a loopback host in its `Host` header: a web page elsewhere that points its own
//!   host name at 127.0.0.1 (DNS rebinding) gets 403.
//! - With a token every page and API call needs it: `Authorization: Bearer <token>`, or the session
//!   cookie the login form sets. Without it: 401 (pages show the login form).
//! - Every POST carries the CSRF token (form field `csrf` or header `X-CSRF-Token`) unless it is
//!   authenticated by its `Authorization` header, which a browser never adds by itself. Without it: 403.
//! - Nothing is changed by a GET: every action is a POST route.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::{pages, Shared};

/// The session cookie's name.
const COOKIE: &str = "machinery_web_session";
/// The most a form body may hold.
const FORM_LIMIT: usize = 64 * 1024;

/// The secrets of one server process.
#[derive(Debug)]
pub(crate) struct Auth {
    token: Option<String>,
    /// The value of the session cookie a login sets (random per process: a restart logs everyone out).
    session: String,
    /// The CSRF token every form and action carries (random per process, shown only to the
    /// authenticated).
    pub(crate) csrf: String,
    local: SocketAddr,
}

fn random_secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Compares without stopping at the first difference, so the time taken says nothing of the secret.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Auth {
    pub(crate) fn new(token: Option<String>, local: SocketAddr) -> Auth {
        Auth {
            token,
            session: random_secret(),
            csrf: random_secret(),
            local,
        }
    }

    /// Whether a token is required.
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()))
    }

    fn cookie_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && same(value.as_bytes(), self.session.as_bytes()))
    }

    /// Without a token: whether the `Host` header names this machine.
    fn host_ok(&self, headers: &HeaderMap) -> bool {
        let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !name.ends_with(']') || host.starts_with('[') => {
                if port.parse::<u16>().is_ok() {
                    name
                } else {
                    host
                }
            }
            _ => host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback() || ip == self.local.ip())
    }
}

/// Runs before every route: authentication, the DNS-rebinding check, CSRF on POST, and headers that
/// keep pages out of frames and scripts to our own.
pub(crate) async fn guard(State(web): State<Shared>, request: Request, next: Next) -> Response {
    let mut response = check(&web, request, next).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn check(web: &Shared, request: Request, next: Next) -> Response {
    let auth = &web.auth;
    let path = request.uri().path().to_owned();
    let headers = request.headers();
    if !auth.has_token() && !auth.host_ok(headers) {
        return (
            StatusCode::FORBIDDEN,
            "this dashboard answers only requests addressed to a loopback host (127.0.0.1, localhost, [::1]); \
             to reach it by another name, start it with a token (see docs/web.md)",
        )
            .into_response();
    }
    let public = path == "/login" || path.starts_with("/assets/");
    let by_header = auth.bearer_ok(headers);
    let authenticated = !auth.has_token() || by_header || auth.cookie_ok(headers);
    if !authenticated && !public {
        if path.starts_with("/api/") {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(serde_json::json!({"error": "this dashboard needs its token: send Authorization: Bearer <token>"})),
            )
                .into_response();
        }
        return (StatusCode::UNAUTHORIZED, pages::login_page(web, None)).into_response();
    }
    if request.method() != Method::POST || path == "/login" || by_header {
        return next.run(request).await;
    }
    // A POST from a browser: it must carry the CSRF token, in a header or in its form.
    let given_header = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, FORM_LIMIT).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "the form is too large").into_response();
        }
    };
    let given = given_header.or_else(|| {
        url_form(&bytes)
            .into_iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v)
    });
    if !given.is_some_and(|g| same(g.as_bytes(), auth.csrf.as_bytes())) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({"error": "missing or wrong CSRF token: actions must come from the dashboard's own forms (or send X-CSRF-Token from GET /api/session)"})),
        )
            .into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The pairs of a URL-encoded form (empty when it is not one).
pub(crate) fn url_form(bytes: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(bytes).unwrap_or_default()
}

/// `GET /login`.
pub(crate) async fn login_form(State(web): State<Shared>) -> Response {
    if !web.auth.has_token() {
        return Redirect::to("/").into_response();
    }
    pages::login_page(&web, None).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// `POST /login`: the right token sets the session cookie.
pub(crate) async fn login(State(web): State<Shared>, Form(login): Form<Login>) -> Response {
    let Some(token) = &web.auth.token else {
        return Redirect::to("/").into_response();
    };
    if !same(login.token.trim().as_bytes(), token.as_bytes()) {
        return (
            StatusCode::UNAUTHORIZED,
            pages::login_page(
                &web,
                Some("That is not the token this dashboard was started with."),
            ),
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        web.auth.session
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

/// `POST /logout`: forgets the cookie.
pub(crate) async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// The dashboard's script (a little plain JavaScript: live refresh and confirmations).
pub(crate) async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

/// The dashboard's stylesheet.
pub(crate) async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/app.css"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn the_host_must_be_loopback_without_a_token() {
        let auth = Auth::new(None, "127.0.0.1:5555".parse().unwrap());
        for host in [
            "127.0.0.1:5555",
            "localhost:5555",
            "[::1]:5555",
            "localhost",
        ] {
            assert!(auth.host_ok(&headers(&[("host", host)])), "{host}");
        }
        for host in ["evil.example:5555", "evil.example", "10.0.0.1:5555"] {
            assert!(!auth.host_ok(&headers(&[("host", host)])), "{host}");
        }
        assert!(!auth.host_ok(&HeaderMap::new()));
    }

    #[test]
    fn bearer_and_cookie_must_match_exactly() {
        let auth = Auth::new(
            Some("s3cret-token-0123456".into()),
            "0.0.0.0:1".parse().unwrap(),
        );
        assert!(auth.bearer_ok(&headers(&[(
            "authorization",
            "Bearer s3cret-token-0123456"
        )])));
        assert!(!auth.bearer_ok(&headers(&[("authorization", "Bearer s3cret-token-012345")])));
        assert!(!auth.bearer_ok(&headers(&[("authorization", "s3cret-token-0123456")])));
        let cookie = format!("a=b; {COOKIE}={}", auth.session);
        assert!(auth.cookie_ok(&headers(&[("cookie", &cookie)])));
        assert!(!auth.cookie_ok(&headers(&[("cookie", "machinery_web_session=x")])));
    }
}
