//! `machinery web`: a dashboard in the browser. Pages are rendered on the server ([`pages`], with
//! charts drawn as SVG by [`charts`]), each backed by a JSON API ([`api`]) that uses the command line's
//! field names ([`crate::report`]). A sampler ([`sampler`]) reads the queues on a timer and keeps an hour
//! of history in memory for the charts and the rates. [`auth`] keeps it to the operator: loopback only
//! unless a token is set, a CSRF token on every action, and no change ever made by a GET.

mod api;
mod auth;
mod charts;
mod pages;
mod queue_page;
mod sampler;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use machinery::backend::BackendError;
use machinery::broker::{Broker, BrokerError, Inspect};
use machinery::{Config, Server};
use serde_json::json;

use crate::cli::WebArgs;
use crate::error::CliError;
use crate::report::why_unsupported;

/// Everything a request handler needs, shared by all of them.
#[derive(Debug)]
pub(crate) struct Web {
    pub(crate) config: Config,
    pub(crate) server: Server,
    /// The broker is the in-process `memory://` one: there is nothing of anyone else's to show.
    pub(crate) in_process: bool,
    /// Queues named with `--queue`, shown besides those the broker finds.
    pub(crate) named: Vec<String>,
    pub(crate) auth: auth::Auth,
    pub(crate) sampler: sampler::Sampler,
}

/// The shared state as handlers take it.
pub(crate) type Shared = Arc<Web>;

impl Web {
    pub(crate) fn broker(&self) -> &dyn Broker {
        self.server.broker().as_ref()
    }

    /// The broker's inspection commands, or why there are none.
    pub(crate) fn inspect(&self) -> Result<&dyn Inspect, WebError> {
        if self.in_process {
            return Err(WebError::InProcess);
        }
        self.broker()
            .inspect()
            .map_err(|e| self.broker_error("inspecting the broker", e))
    }

    /// A broker error as the dashboard reports it, explaining what the broker cannot answer.
    pub(crate) fn broker_error(&self, what: impl Into<String>, error: BrokerError) -> WebError {
        match error {
            BrokerError::Unsupported { operation, .. } => WebError::Unsupported {
                what: what.into(),
                broker: self.broker().kind(),
                why: why_unsupported(self.broker().kind(), operation),
            },
            source => WebError::Broker {
                what: what.into(),
                source,
            },
        }
    }

    /// The broker URL with its password replaced, for the page header.
    pub(crate) fn broker_label(&self) -> String {
        machinery::config::redact_url(&self.config.broker)
    }
}

/// Why a page or an API call could not be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WebError {
    /// The in-process broker: no other process's queues can be seen from here.
    #[error("the broker is the in-process memory:// broker: it holds only this process's own (empty) queues, not those of your workers and senders. Start `machinery web` with the broker your workers use (BROKER, -c FILE or --broker URL)")]
    InProcess,
    /// The broker cannot answer this question at all.
    #[error("{what}: the {broker} broker cannot answer this: {why}")]
    Unsupported {
        what: String,
        broker: &'static str,
        why: String,
    },
    /// A broker operation failed.
    #[error("{what}: {source}")]
    Broker {
        what: String,
        #[source]
        source: BrokerError,
    },
    /// A result backend operation failed.
    #[error("{what}: {source}")]
    Backend {
        what: String,
        #[source]
        source: BackendError,
    },
    /// The thing asked about does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
}

impl WebError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            WebError::InProcess => StatusCode::SERVICE_UNAVAILABLE,
            WebError::Unsupported { .. } => StatusCode::NOT_IMPLEMENTED,
            WebError::Broker { .. } | WebError::Backend { .. } => StatusCode::BAD_GATEWAY,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// API errors are JSON: `{"error": "..."}`.
impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        (
            self.status(),
            axum::Json(json!({"error": self.to_string()})),
        )
            .into_response()
    }
}

/// Whether `addr` can only be reached from this machine.
fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Checks the options, connects, starts the sampler and serves until Ctrl-C.
pub(crate) async fn serve(config: Config, args: WebArgs) -> Result<(), CliError> {
    let addr: SocketAddr = args.listen.parse().map_err(|_| {
        CliError::Usage(format!(
            "--listen {:?}: expected an address and port such as 127.0.0.1:5555 or 0.0.0.0:5555",
            args.listen
        ))
    })?;
    let token = args.token.filter(|t| !t.is_empty());
    if !is_loopback(&addr) && token.is_none() {
        return Err(CliError::Usage(format!(
            "refusing to serve on {addr} without a token: the dashboard can purge queues and requeue or \
             delete messages, and {addr} is reachable from other machines. Set --token or \
             MACHINERY_WEB_TOKEN (every page and API call will then need it), or listen on 127.0.0.1"
        )));
    }
    if let Some(token) = &token {
        if token.chars().count() < 16 {
            return Err(CliError::Usage(
                "the web token is too short to keep a dashboard safe: use at least 16 characters \
                 (for example the output of `openssl rand -hex 16`)"
                    .to_owned(),
            ));
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let in_process = config.broker.trim_start().starts_with("memory:");
    let server = Server::new(config.clone())
        .await
        .map_err(CliError::Connect)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Serve {
            what: format!("listening on {addr}"),
            source: e,
        })?;
    let local = listener.local_addr().map_err(|e| CliError::Serve {
        what: "reading the listening address".to_owned(),
        source: e,
    })?;
    let web = Arc::new(Web {
        named: args.queues,
        sampler: sampler::Sampler::new(Duration::from_secs(args.sample_every)),
        auth: auth::Auth::new(token, local),
        in_process,
        server,
        config,
    });
    if !in_process {
        tokio::spawn(sampler::run(web.clone()));
    }
    let app = router(web.clone());
    // Tests and scripts read this line to learn the port (with --listen 127.0.0.1:0).
    eprintln!(
        "machinery web: serving on http://{local}/ (broker {})",
        web.broker_label()
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| CliError::Serve {
            what: format!("serving on {local}"),
            source: e,
        })
}

/// Every route; the guard in [`auth`] runs before each.
fn router(web: Shared) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/workers", get(pages::workers))
        .route("/tasks", get(queue_page::task_lookup))
        .route("/tasks/{uuid}", get(queue_page::task))
        .route("/queues/{queue}", get(queue_page::queue))
        .route("/login", get(auth::login_form).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/assets/app.js", get(auth::script))
        .route("/assets/app.css", get(auth::stylesheet))
        .route("/api/session", get(api::session))
        .route("/api/queues", get(api::queues))
        .route("/api/queues/{queue}", get(api::queue))
        .route("/api/queues/{queue}/pending", get(api::pending))
        .route("/api/queues/{queue}/dead", get(api::dead))
        .route("/api/queues/{queue}/dead/requeue", post(api::requeue))
        .route("/api/queues/{queue}/dead/delete", post(api::delete_dead))
        .route("/api/queues/{queue}/purge", post(api::purge))
        .route("/api/delayed", get(api::delayed))
        .route("/api/workers", get(api::workers))
        .route("/api/history", get(api::history))
        .route("/api/tasks/{uuid}", get(api::task))
        .route("/api/tasks/{uuid}/revoke", post(api::revoke))
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            auth::guard,
        ))
        .with_state(web)
}
