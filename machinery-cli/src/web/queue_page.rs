//! The Queue page (pending, delayed and dead messages, with the actions), the Task page, and the pages
//! a plain form (without our script) gets: a confirmation before an action, and an error.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::Utc;
use maud::{html, Markup};
use serde::Deserialize;

use super::api::{self, InQueue, Params, DEFAULT_LIMIT};
use super::charts::{line_chart, window, Series};
use super::pages::{count, cut, error_box, layout, rate, throughput_series};
use super::{sampler, Shared, WebError};
use crate::message::{when, Message};

/// `s` as one URL path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The page of a queue.
pub(crate) fn queue_path(queue: &str) -> String {
    format!("/queues/{}", encode(queue))
}

/// The page of a task.
pub(crate) fn task_path(uuid: &str) -> String {
    format!("/tasks/{}", encode(uuid))
}

/// A form that POSTs `action` after a confirmation (our script asks in a dialog; without it the
/// server shows a confirmation page first).
fn action(
    web: &Shared,
    url: &str,
    question: &str,
    fields: &[(&str, &str)],
    label: &str,
    class: &str,
) -> Markup {
    html! {
        form.action action=(url) method="post" data-confirm=(question) {
            input type="hidden" name="csrf" value=(web.auth.csrf);
            @for (name, value) in fields { input type="hidden" name=(name) value=(value); }
            button type="submit" class=(class) { (label) }
        }
    }
}

/// `?limit=&peek=`.
#[derive(Debug, Deserialize, Default)]
pub(crate) struct QueueQuery {
    limit: Option<usize>,
    peek: Option<u8>,
}

/// `GET /queues/<q>`.
pub(crate) async fn queue(
    State(web): State<Shared>,
    Path(queue): Path<String>,
    Query(query): Query<QueueQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(1000);
    let amqp = web.broker().kind() == "amqp";
    // Reading an AMQP queue takes the messages and hands them back marked redelivered: only on request,
    // and never by the live refresh.
    let peek = !amqp || query.peek == Some(1);
    let stats = api::queue_stats(&web, &queue).await;
    let pending = if peek {
        Some(api::pending_list(&web, &queue, limit).await)
    } else {
        None
    };
    let delayed = api::delayed_of(&web, &queue, limit).await;
    let dead = api::dead_list(&web, &queue, limit).await;
    let path = queue_path(&queue);
    let purge_url = format!("/api/queues/{}/purge", encode(&queue));
    let requeue_url = format!("/api/queues/{}/dead/requeue", encode(&queue));
    let delete_url = format!("/api/queues/{}/dead/delete", encode(&queue));
    let now = Utc::now();
    let history = web.sampler.history(&queue);
    let now_ms = now.timestamp_millis();
    let depth = vec![Series {
        label: "pending".into(),
        points: history
            .iter()
            .map(|s| (s.at_ms, s.pending as f64))
            .collect(),
    }];
    let throughput = throughput_series(std::iter::once(history.as_slice()));
    let window = window(&depth, now_ms, sampler::HOUR.as_millis() as i64);
    let rates = web.sampler.rates(&queue);
    let why = "RabbitMQ does not tell this over AMQP";
    let revoke = |uuid: &str| {
        action(
            &web,
            &format!("/api/tasks/{}/revoke", encode(uuid)),
            &format!(
                "Revoke task {uuid}? A worker that receives it will drop it without running it."
            ),
            &[("back", &path)],
            "Revoke",
            "small",
        )
    };
    let body = html! {
        h1 { "Queue " code { (cut(&queue)) } }
        @match &stats {
            Err(error) => (error_box(error)),
            Ok(stats) => {
                dl.counts #counts {
                    div { dt { "Pending" } dd data-field="pending" { (stats.pending) } }
                    div { dt { "Delayed" } dd data-field="delayed" { (count(stats.delayed, why)) } }
                    div { dt { "In flight" } dd data-field="in_flight" { (count(stats.in_flight, why)) } }
                    div { dt { "Dead" } dd data-field="dead" { (count(stats.dead, why)) } }
                    div { dt { "Succeeded/min" } dd { (rate(rates.succeeded)) } }
                    div { dt { "Failed/min" } dd { (rate(rates.failed)) } }
                }
                (action(&web, &purge_url,
                    &format!("Delete every message waiting in queue {queue}? Delayed messages and dead letters stay."),
                    &[("back", &path)], "Purge queue", "danger"))
            }
        }
        section.charts {
            (line_chart("depth-chart", "Pending", &depth, now_ms, window))
            (line_chart("throughput-chart", "Tasks finished per minute", &throughput, now_ms, window))
        }
        section #pending {
            h2 { "Pending" small { " (first " (limit) ")" } }
            @match &pending {
                None => p.note { "RabbitMQ can only show waiting messages by taking them and handing them back \
                    (they come back marked redelivered, and workers see them a moment later). "
                    a href=(format!("{path}?peek=1")) { "Show the first " (limit) } },
                Some(Err(error)) => (error_box(error)),
                Some(Ok(messages)) if messages.is_empty() => p.note { "Nothing waiting." },
                Some(Ok(messages)) => (message_table(&queue, messages.iter().map(|m| (None, m)), &revoke)),
            }
        }
        section #delayed {
            h2 { "Delayed" }
            @match &delayed {
                Err(error) => p.note { (error.to_string()) },
                Ok(rows) if rows.is_empty() => p.note { "No delayed message for this queue." },
                Ok(rows) => (message_table(&queue, rows.iter().map(|(eta, m)| (Some(when(eta, now)), m)), &revoke)),
            }
        }
        section #dead {
            h2 { "Dead letters" }
            @match &dead {
                Err(error) => (error_box(error)),
                Ok(letters) if letters.is_empty() => p.note #no-dead { "No dead letters." },
                Ok(letters) => {
                    (action(&web, &requeue_url, &format!("Requeue every dead letter of queue {queue}?"),
                        &[("back", &path)], "Requeue all", "primary"))
                    table #dead-letters {
                        thead { tr { th { "When" } th { "Task" } th { "Name" } th { "Reason" } th { "" } } }
                        tbody {
                            @for letter in letters {
                                @let m = Message::decode(&letter.body);
                                tr {
                                    td { (when(&letter.at, now)) }
                                    td { (task_link(&queue, m.uuid())) }
                                    td { (cut(&m.name())) }
                                    td.bad { (cut(&letter.reason)) }
                                    td.actions {
                                        @if m.uuid() != "-" {
                                            (action(&web, &requeue_url, &format!("Requeue the dead letters of task {} onto queue {queue}?", m.uuid()),
                                                &[("uuid", m.uuid()), ("back", &path)], "Requeue", "small"))
                                            (action(&web, &delete_url, &format!("Delete the dead letters of task {} for good?", m.uuid()),
                                                &[("uuid", m.uuid()), ("back", &path)], "Delete", "small danger"))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    // On AMQP even the dead letters are read by taking them and handing them back: no live refresh.
    layout(&web, &format!("Queue {queue}"), !amqp, body).into_response()
}

fn task_link(queue: &str, uuid: &str) -> Markup {
    if uuid == "-" {
        return html! { "–" };
    }
    html! { a href=(format!("{}?queue={}", task_path(uuid), encode(queue))) { code { (cut(uuid)) } } }
}

/// Pending or delayed messages: (due, message) rows.
fn message_table<'a>(
    queue: &str,
    rows: impl Iterator<Item = (Option<String>, &'a Message)>,
    revoke: &dyn Fn(&str) -> Markup,
) -> Markup {
    let rows: Vec<_> = rows.collect();
    let due = rows.iter().any(|(d, _)| d.is_some());
    html! {
        table.messages {
            thead { tr { @if due { th { "Due" } } th { "Task" } th { "Name" } th { "Arguments" } th { "" } } }
            tbody {
                @for (when, m) in &rows {
                    tr {
                        @if due { td { (when.clone().unwrap_or_default()) } }
                        td { (task_link(queue, m.uuid())) }
                        td { (cut(&m.name())) }
                        td.args { (cut(&m.args_summary())) }
                        td.actions { @if m.uuid() != "-" { (revoke(m.uuid())) } }
                    }
                }
            }
        }
    }
}

/// `GET /tasks?uuid=`: the lookup form's target.
#[derive(Debug, Deserialize)]
pub(crate) struct Lookup {
    uuid: Option<String>,
}

pub(crate) async fn task_lookup(State(web): State<Shared>, Query(q): Query<Lookup>) -> Response {
    match q.uuid.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
        Some(uuid) => Redirect::to(&task_path(uuid)).into_response(),
        None => layout(
            &web,
            "Find a task",
            false,
            html! {
                h1 { "Find a task" }
                p { "Enter a task id (task_…) or a group id in the box at the top." }
            },
        )
        .into_response(),
    }
}

/// `GET /tasks/<uuid>?queue=`.
pub(crate) async fn task(
    State(web): State<Shared>,
    Path(uuid): Path<String>,
    Query(q): Query<InQueue>,
) -> Response {
    let view = api::task_view(&web, &uuid, q.queue.as_deref()).await;
    let now = Utc::now();
    let queue = q
        .queue
        .clone()
        .unwrap_or_else(|| web.config.default_queue.clone());
    let body = html! {
        h1 { "Task " code { (cut(&uuid)) } }
        @match &view {
            Err(error) => (error_box(error)),
            Ok(view) => {
                table.fields #task {
                    @if let Some(state) = &view.state {
                        tr { th { "State" } td data-field="state" class=(state_class(state.state.as_str())) { (state.state.as_str()) } }
                        tr { th { "Name" } td { (cut(&state.task_name)) } }
                        tr { th { "Created" } td { (when(&state.created_at, now)) } }
                        tr { th { "Result" } td {
                            @match &state.results {
                                None => "–",
                                Some(results) if results.is_empty() => "(none)",
                                Some(results) => @for r in results { div { (cut(&crate::message::result_summary(r))) } },
                            }
                        } }
                        @if !state.error.is_empty() { tr { th { "Error" } td.bad { (cut(&state.error)) } } }
                    } @else {
                        tr { th { "State" } td { "no state stored" } }
                    }
                    // What the task reported with `ctx.set_progress` (stored with its STARTED record).
                    tr #progress {
                        th { "Progress" }
                        @match view.state.as_ref().and_then(|s| s.progress.as_ref()) {
                            Some(progress) => td data-field="progress" { code { (cut(&progress.to_string())) } },
                            None => td.note { "–" },
                        }
                    }
                    @if let Some((place, m)) = &view.message {
                        tr { th { "Message" } td { (place) " in queue " a href=(queue_path(&queue)) { (cut(&queue)) } } }
                        @if let Some(s) = m.signature() {
                            tr { th { "Arguments" } td.args { (cut(&m.args_summary())) } }
                            tr { th { "ETA" } td { (view.due.or(s.eta).map_or("–".to_owned(), |eta| when(&eta, now))) } }
                            tr { th { "Retries" } td { (s.retry_count) " left" @if s.retry_timeout > 0 { ", next pause " (s.retry_timeout) " s" } } }
                            @if !s.group_uuid.is_empty() {
                                tr { th { "Group" } td { a href=(task_path(&s.group_uuid)) { code { (cut(&s.group_uuid)) } } " (" (s.group_task_count) " tasks)" } }
                            }
                            @if let Some(cb) = &s.chord_callback {
                                tr { th { "Chord callback" } td { (link_or_name(&cb.uuid, &cb.name)) } }
                            }
                            @for next in &s.on_success { tr { th { "Then (chain)" } td { (link_or_name(&next.uuid, &next.name)) } } }
                            @for next in &s.on_error { tr { th { "On error" } td { (link_or_name(&next.uuid, &next.name)) } } }
                        }
                    }
                }
                @if let Some((meta, states)) = &view.group {
                    h2 { "Group members" }
                    table #group {
                        thead { tr { th { "Task" } th { "Name" } th { "State" } } }
                        tbody {
                            @for id in &meta.task_uuids {
                                @let st = states.iter().find(|s| &s.task_uuid == id);
                                tr {
                                    td { a href=(task_path(id)) { code { (cut(id)) } } }
                                    td { (st.map_or("–".to_owned(), |s| cut(&s.task_name))) }
                                    td { (st.map_or("–", |s| s.state.as_str())) }
                                }
                            }
                        }
                    }
                    @if meta.chord_triggered { p.note { "The chord's callback was sent." } }
                }
                @let waiting = view.state.as_ref().is_none_or(|s| matches!(s.state.as_str(), "PENDING" | "RECEIVED" | "RETRY"));
                @if waiting && view.group.is_none() {
                    (action(&web, &format!("/api/tasks/{}/revoke", encode(&uuid)),
                        &format!("Revoke task {uuid}? A worker that receives it will drop it without running it."),
                        &[], "Revoke", "danger"))
                }
            }
        }
    };
    let status = match &view {
        Err(e) => e.status(),
        Ok(_) => axum::http::StatusCode::OK,
    };
    (status, layout(&web, &format!("Task {uuid}"), false, body)).into_response()
}

fn link_or_name(uuid: &str, name: &str) -> Markup {
    html! {
        @if uuid.is_empty() { (cut(name)) " (no id yet: it gets one when sent)" }
        @else { a href=(task_path(uuid)) { code { (cut(uuid)) } } " " (cut(name)) }
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "SUCCESS" => "good",
        "FAILURE" => "bad",
        "PENDING" | "RECEIVED" | "RETRY" | "STARTED" => "warn",
        _ => "",
    }
}

/// What a plain form gets before an action runs: the question and a button that confirms.
pub(crate) fn confirm_page(web: &Shared, question: &str, params: &Params) -> Markup {
    layout(
        web,
        "Confirm",
        false,
        html! {
            h1 { "Confirm" }
            p { (question) }
            form method="post" {
                input type="hidden" name="csrf" value=(web.auth.csrf);
                input type="hidden" name="confirmed" value="1";
                @for key in ["uuid", "back"] {
                    @if let Some(value) = params.get(key) { input type="hidden" name=(key) value=(value); }
                }
                button.danger type="submit" { "Confirm" }
                " "
                a href=(api::back(params, "/".to_owned())) { "Cancel" }
            }
        },
    )
}

/// What a plain form gets when its action failed.
pub(crate) fn error_page(web: &Shared, error: &WebError) -> impl IntoResponse {
    (
        error.status(),
        layout(web, "Error", false, error_box(error)),
    )
}
