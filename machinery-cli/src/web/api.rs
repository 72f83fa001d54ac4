//! The JSON API behind every page, and the actions. The records are the command line's `--json` ones
//! ([`crate::report`]); the page handlers read the same data through the functions here.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use chrono::Utc;
use machinery::broker::{DeadLetter, QueueStats, WorkerInfo};
use machinery::{GroupMeta, TaskState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::sampler::{self, Rates};
use super::{queue_page, Shared, WebError};
use crate::message::Message;
use crate::report;

/// How many messages a list shows unless told otherwise, and the most it shows.
pub(crate) const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;
/// How many delayed messages are read to find one queue's (Redis keeps one set for all queues).
const DELAYED_SCAN: usize = 1000;

/// `?limit=`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct Limit {
    limit: Option<usize>,
}

impl Limit {
    pub(crate) fn get(&self) -> usize {
        self.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT)
    }
}

// ---- What the pages and the API read ----

/// Every queue's counts, with its rates from the sampler.
pub(crate) async fn queue_rows(web: &Shared) -> Result<Vec<(QueueStats, Rates)>, WebError> {
    let inspect = web.inspect()?;
    let mut rows = Vec::new();
    for queue in sampler::queues(web).await? {
        let stats = inspect.queue_stats(&queue).await.map_err(|e| {
            web.broker_error(format!("counting the messages of queue {queue:?}"), e)
        })?;
        let rates = web.sampler.rates(&queue);
        rows.push((stats, rates));
    }
    Ok(rows)
}

/// One queue's counts.
pub(crate) async fn queue_stats(web: &Shared, queue: &str) -> Result<QueueStats, WebError> {
    web.inspect()?
        .queue_stats(queue)
        .await
        .map_err(|e| web.broker_error(format!("counting the messages of queue {queue:?}"), e))
}

/// The workers the broker knows of.
pub(crate) async fn worker_list(web: &Shared) -> Result<Vec<WorkerInfo>, WebError> {
    web.inspect()?
        .workers()
        .await
        .map_err(|e| web.broker_error("listing workers", e))
}

/// The first `limit` messages waiting in `queue`.
pub(crate) async fn pending_list(
    web: &Shared,
    queue: &str,
    limit: usize,
) -> Result<Vec<Message>, WebError> {
    let bodies = web
        .inspect()?
        .pending(queue, limit)
        .await
        .map_err(|e| web.broker_error(format!("listing the messages of queue {queue:?}"), e))?;
    Ok(bodies.iter().map(|b| Message::decode(b)).collect())
}

/// The first `limit` dead letters of `queue`.
pub(crate) async fn dead_list(
    web: &Shared,
    queue: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, WebError> {
    web.inspect()?
        .dead_letters(queue, limit)
        .await
        .map_err(|e| web.broker_error(format!("listing the dead letters of queue {queue:?}"), e))
}

/// The delayed messages of `queue` among the earliest [`DELAYED_SCAN`] of all queues, earliest first.
pub(crate) async fn delayed_of(
    web: &Shared,
    queue: &str,
    limit: usize,
) -> Result<Vec<(chrono::DateTime<Utc>, Message)>, WebError> {
    let delayed = web
        .inspect()?
        .delayed(DELAYED_SCAN)
        .await
        .map_err(|e| web.broker_error("listing delayed messages", e))?;
    Ok(delayed
        .iter()
        .map(|d| (d.eta, Message::decode(&d.body)))
        .filter(|(_, m)| match m.routing_key() {
            "-" => queue == web.config.default_queue,
            key => key == queue,
        })
        .take(limit)
        .collect())
}

/// What is known of one task: its state, the group it names (if the id is a group's), and its message
/// if it is still waiting in the queue, among the delayed ones or among the dead letters.
#[derive(Debug, Default)]
pub(crate) struct TaskView {
    pub(crate) state: Option<TaskState>,
    pub(crate) group: Option<(GroupMeta, Vec<TaskState>)>,
    /// Where the message was found, and the message.
    pub(crate) message: Option<(&'static str, Message)>,
    pub(crate) due: Option<chrono::DateTime<Utc>>,
}

/// Looks a task (or group) up; `queue` is where to look for its message (the default queue if `None`).
pub(crate) async fn task_view(
    web: &Shared,
    uuid: &str,
    queue: Option<&str>,
) -> Result<TaskView, WebError> {
    let backend = web.server.backend();
    let backend_error = |what: String| move |source| WebError::Backend { what, source };
    let state = backend
        .get_state(uuid)
        .await
        .map_err(backend_error(format!("reading the state of task {uuid}")))?;
    let group = match backend.get_group(uuid).await {
        // Go's Redis layout keeps groups and task states under their ids in one keyspace: a task's
        // record read as a group has no members.
        Ok(Some(meta)) if meta.group_uuid == uuid && !meta.task_uuids.is_empty() => {
            let states = backend
                .group_states(uuid)
                .await
                .map_err(backend_error(format!("reading the states of group {uuid}")))?;
            Some((meta, states))
        }
        _ => None,
    };
    let mut view = TaskView {
        // Read the other way round, a group's record decodes as a state without an id.
        state: state.filter(|s| s.task_uuid == uuid),
        group,
        ..TaskView::default()
    };
    if let Ok(inspect) = web.inspect() {
        let queue = queue.unwrap_or(&web.config.default_queue);
        let mine = |body: &[u8]| Message::decode(body).uuid() == uuid;
        if let Ok(bodies) = inspect.pending(queue, 200).await {
            if let Some(body) = bodies.iter().find(|b| mine(b)) {
                view.message = Some(("pending", Message::decode(body)));
            }
        }
        if view.message.is_none() {
            if let Ok(delayed) = inspect.delayed(DELAYED_SCAN).await {
                if let Some(d) = delayed.iter().find(|d| mine(&d.body)) {
                    view.message = Some(("delayed", Message::decode(&d.body)));
                    view.due = Some(d.eta);
                }
            }
        }
        if view.message.is_none() {
            if let Ok(letters) = inspect.dead_letters(queue, 200).await {
                if let Some(l) = letters.iter().find(|l| mine(&l.body)) {
                    view.message = Some(("dead", Message::decode(&l.body)));
                }
            }
        }
    }
    if view.state.is_none() && view.group.is_none() && view.message.is_none() {
        return Err(WebError::NotFound(format!(
            "task {uuid}: no state in the {} result backend, no group of that id, and no message of it \
             in queue {:?} (a wrong id, or the result expired: results are kept {} s)",
            backend.kind(),
            queue.unwrap_or(&web.config.default_queue),
            web.config.results_expire_in_secs()
        )));
    }
    Ok(view)
}

// ---- GET handlers ----

/// `GET /api/session`: the CSRF token scripts send with their actions (as `X-CSRF-Token`).
pub(crate) async fn session(State(web): State<Shared>) -> Json<Value> {
    Json(json!({"csrf": web.auth.csrf, "broker": web.broker_label(), "in_process": web.in_process}))
}

/// `GET /api/queues`: `[{"name", "queue", "pending", "delayed", "in_flight", "dead",
/// "succeeded_per_min", "failed_per_min"}]`.
pub(crate) async fn queues(State(web): State<Shared>) -> Result<Json<Value>, WebError> {
    let rows = queue_rows(&web).await?;
    Ok(Json(Value::Array(
        rows.iter()
            .map(|(stats, rates)| {
                let mut row = report::queue_json(stats);
                row["succeeded_per_min"] = json!(rates.succeeded);
                row["failed_per_min"] = json!(rates.failed);
                row
            })
            .collect(),
    )))
}

/// `GET /api/queues/<q>`.
pub(crate) async fn queue(
    State(web): State<Shared>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, WebError> {
    Ok(Json(report::queue_json(&queue_stats(&web, &queue).await?)))
}

/// `GET /api/queues/<q>/pending?limit=`.
pub(crate) async fn pending(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<Value>, WebError> {
    let messages = pending_list(&web, &queue, limit.get()).await?;
    Ok(Json(Value::Array(
        messages.iter().map(Message::to_json).collect(),
    )))
}

/// `GET /api/queues/<q>/dead?limit=`.
pub(crate) async fn dead(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    Query(limit): Query<Limit>,
) -> Result<Json<Value>, WebError> {
    let letters = dead_list(&web, &queue, limit.get()).await?;
    Ok(Json(Value::Array(
        letters.iter().map(report::dead_letter_json).collect(),
    )))
}

/// `GET /api/delayed?limit=`: every queue's, earliest first.
pub(crate) async fn delayed(
    State(web): State<Shared>,
    Query(limit): Query<Limit>,
) -> Result<Json<Value>, WebError> {
    let delayed = web
        .inspect()?
        .delayed(limit.get())
        .await
        .map_err(|e| web.broker_error("listing delayed messages", e))?;
    Ok(Json(Value::Array(
        delayed.iter().map(report::delayed_json).collect(),
    )))
}

/// `GET /api/workers`.
pub(crate) async fn workers(State(web): State<Shared>) -> Result<Json<Value>, WebError> {
    let workers = worker_list(&web).await?;
    Ok(Json(Value::Array(
        workers.iter().map(report::worker_json).collect(),
    )))
}

/// `GET /api/history`: each queue's samples of the last hour, `{"<queue>": [{"at_ms", "pending",
/// "succeeded", "failed"}]}` (the counters are running totals since the dashboard started).
pub(crate) async fn history(State(web): State<Shared>) -> Json<Value> {
    let all = web.sampler.all();
    Json(Value::Object(
        all.into_iter()
            .map(|(queue, samples)| {
                let rows = samples
                    .iter()
                    .map(|s| json!({"at_ms": s.at_ms, "pending": s.pending, "succeeded": s.succeeded, "failed": s.failed}))
                    .collect();
                (queue, Value::Array(rows))
            })
            .collect(),
    ))
}

/// `?queue=`: where to look for a task's message.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct InQueue {
    pub(crate) queue: Option<String>,
}

/// `GET /api/tasks/<uuid>?queue=`: the state as Go's record (`null` if none), the group's members if
/// the id is a group's, and the message if found.
pub(crate) async fn task(
    State(web): State<Shared>,
    Path(uuid): Path<String>,
    Query(q): Query<InQueue>,
) -> Result<Json<Value>, WebError> {
    let view = task_view(&web, &uuid, q.queue.as_deref()).await?;
    let mut out = json!({
        "uuid": uuid,
        "state": view.state.as_ref().map(report::state_json),
    });
    if let Some((meta, states)) = &view.group {
        out["group"] = json!({
            "group_uuid": meta.group_uuid,
            "task_uuids": meta.task_uuids,
            "chord_triggered": meta.chord_triggered,
            "states": states.iter().map(report::state_json).collect::<Vec<_>>(),
        });
    }
    if let Some((place, message)) = &view.message {
        out["found_in"] = json!(place);
        out["message"] = message.to_json();
    }
    if let Some(due) = &view.due {
        out["due"] = json!(machinery::wire::gotime::format(due));
    }
    Ok(Json(out))
}

// ---- Actions (POST) ----

/// An action's parameters, from a URL-encoded form (the pages) or a JSON object (scripts).
#[derive(Debug, Default)]
pub(crate) struct Params(HashMap<String, String>);

impl Params {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Params {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if json {
            let map = serde_json::from_slice::<serde_json::Map<String, Value>>(body)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k, s)),
                    Value::Bool(b) => Some((k, b.to_string())),
                    _ => None,
                })
                .collect();
            return Params(map);
        }
        Params(super::auth::url_form(body).into_iter().collect())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Whether the caller is a browser form without our script (it gets pages and redirects, not JSON).
fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// Where a form asked to go back to: a path on this site only.
pub(crate) fn back(params: &Params, default: String) -> String {
    match params.get("back") {
        // A path on this site, in characters a Location header can carry as they are.
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && path.chars().all(|c| c.is_ascii_graphic() && c != '\\') =>
        {
            path.to_owned()
        }
        _ => default,
    }
}

/// The common shape of an action: without our script the form first shows a confirmation page; then
/// the action runs and the answer is JSON, or a redirect back for a plain form.
async fn act<F, Fut>(
    web: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    question: String,
    default_back: String,
    run: F,
) -> Response
where
    F: FnOnce(Params) -> Fut,
    Fut: std::future::Future<Output = Result<Value, WebError>>,
{
    let params = Params::parse(headers, body);
    let html = wants_html(headers);
    if html && params.get("confirmed") != Some("1") {
        return queue_page::confirm_page(web, &question, &params).into_response();
    }
    let to = back(&params, default_back);
    match run(params).await {
        Ok(_) if html => Redirect::to(&to).into_response(),
        Ok(value) => Json(value).into_response(),
        Err(error) if html => queue_page::error_page(web, &error).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `POST /api/queues/<q>/dead/requeue` (`uuid`: only that task's; otherwise all): `{"queue",
/// "requeued"}`.
pub(crate) async fn requeue(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let uuid = Params::parse(&headers, &body)
        .get("uuid")
        .map(str::to_owned);
    let question = match &uuid {
        Some(uuid) => format!("Requeue the dead letters of task {uuid} onto queue {queue}?"),
        None => format!("Requeue every dead letter of queue {queue}?"),
    };
    let w = web.clone();
    let back = queue_page::queue_path(&queue);
    act(&web, &headers, &body, question, back, |_| async move {
        let moved = w
            .inspect()?
            .requeue_dead(&queue, uuid.as_deref())
            .await
            .map_err(|e| {
                w.broker_error(format!("requeueing the dead letters of queue {queue:?}"), e)
            })?;
        if let (Some(uuid), 0) = (&uuid, moved) {
            return Err(WebError::NotFound(format!(
                "queue {queue:?} has no dead letter of task {uuid}"
            )));
        }
        let noun = if moved == 1 {
            "dead letter"
        } else {
            "dead letters"
        };
        Ok(json!({"queue": queue, "requeued": moved,
                  "message": format!("requeued {moved} {noun} onto queue {queue}")}))
    })
    .await
}

/// `POST /api/queues/<q>/dead/delete` with `uuid`: `{"queue", "deleted"}`.
pub(crate) async fn delete_dead(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(uuid) = Params::parse(&headers, &body)
        .get("uuid")
        .map(str::to_owned)
    else {
        return WebError::BadRequest("which dead letter? send the task id as uuid".to_owned())
            .into_response();
    };
    let question = format!("Delete the dead letters of task {uuid} from queue {queue} for good?");
    let w = web.clone();
    let back = queue_page::queue_path(&queue);
    act(&web, &headers, &body, question, back, |_| async move {
        let deleted =
            w.inspect()?.delete_dead(&queue, &uuid).await.map_err(|e| {
                w.broker_error(format!("deleting dead letters of queue {queue:?}"), e)
            })?;
        if deleted == 0 {
            return Err(WebError::NotFound(format!(
                "queue {queue:?} has no dead letter of task {uuid}"
            )));
        }
        Ok(json!({"queue": queue, "deleted": deleted,
                  "message": format!("deleted {deleted} dead letter(s) of task {uuid}")}))
    })
    .await
}

/// `POST /api/queues/<q>/purge`: `{"queue", "purged"}`.
pub(crate) async fn purge(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let question = format!(
        "Delete every message waiting in queue {queue}? (Delayed messages and dead letters stay.)"
    );
    let w = web.clone();
    let back = queue_page::queue_path(&queue);
    act(&web, &headers, &body, question, back, |_| async move {
        let purged = w
            .inspect()?
            .purge(&queue)
            .await
            .map_err(|e| w.broker_error(format!("purging queue {queue:?}"), e))?;
        let noun = if purged == 1 { "message" } else { "messages" };
        Ok(json!({"queue": queue, "purged": purged,
                  "message": format!("purged {purged} {noun} from queue {queue}")}))
    })
    .await
}

/// `POST /api/tasks/<uuid>/revoke`: the task will not run (a worker that receives it acknowledges it
/// without running it): `{"uuid", "revoked": true}`.
pub(crate) async fn revoke(
    State(web): State<Shared>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let question =
        format!("Revoke task {uuid}? A worker that receives it will drop it without running it.");
    let w = web.clone();
    let back = queue_page::task_path(&uuid);
    act(&web, &headers, &body, question, back, |_| async move {
        if w.in_process {
            return Err(WebError::InProcess);
        }
        w.server
            .revoke(&uuid)
            .await
            .map_err(|source| WebError::Backend {
                what: format!("revoking task {uuid}"),
                source,
            })?;
        Ok(json!({"uuid": uuid, "revoked": true, "message": format!("revoked task {uuid}")}))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_goes_back_only_to_a_path_of_this_site() {
        let params = |back: &str| Params([("back".to_owned(), back.to_owned())].into());
        let default = || "/fallback".to_owned();
        assert_eq!(
            back(&params("/queues/q%20x#dead"), default()),
            "/queues/q%20x#dead"
        );
        for evil in [
            "//evil.example/",
            "https://evil.example/",
            "javascript:alert(1)",
            "/a\\b",
            "/a\nLocation: x",
            "/ü",
        ] {
            assert_eq!(back(&params(evil), default()), "/fallback", "{evil:?}");
        }
    }
}
