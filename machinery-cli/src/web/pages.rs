//! The pages' frame (header, navigation, notices), the login form, and the Overview and Workers pages.
//! Every value from a queue is escaped by maud; long ones are cut ([`cut`]).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use maud::{html, Markup, DOCTYPE};

use super::charts::{line_chart, window, Series};
use super::sampler::{self, Rates};
use super::{api, queue_page, Shared, WebError};
use crate::output::{escape, truncate};

/// The longest text a table cell shows (the JSON API has it whole).
pub(crate) const CELL_MAX: usize = 80;

/// `text` for a table cell: control characters written out, cut to [`CELL_MAX`].
pub(crate) fn cut(text: &str) -> String {
    truncate(&escape(text), CELL_MAX)
}

/// A count, or a dash with the reason as a tooltip when the broker cannot tell.
pub(crate) fn count(n: Option<u64>, why_not: &str) -> Markup {
    match n {
        Some(n) => html! { (n) },
        None => html! { abbr title=(why_not) { "–" } },
    }
}

/// A rate per minute, or a dash.
pub(crate) fn rate(r: Option<f64>) -> Markup {
    match r {
        Some(r) if r >= 10.0 => html! { (format!("{r:.0}")) },
        Some(r) => html! { (format!("{r:.1}")) },
        None => {
            html! { abbr title="no worker reports its counters here (RabbitMQ keeps no heartbeats), or not sampled yet" { "–" } }
        }
    }
}

/// `3.2s ago`, `4m ago`.
pub(crate) fn ago(age: Duration) -> String {
    let secs = age.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1}s ago")
    } else if secs < 120.0 {
        format!("{}s ago", secs as u64)
    } else {
        format!("{}m ago", secs as u64 / 60)
    }
}

/// The frame of every page. `live` makes the script re-fetch the page every sampling period and swap
/// in its `<main>` (no reload).
pub(crate) fn layout(web: &Shared, title: &str, live: bool, body: Markup) -> Markup {
    let every_ms = web.sampler.every.as_millis().clamp(1000, 10_000);
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(web.auth.csrf);
                title { (title) " · machinery" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "machinery" }
                    nav {
                        a href="/" { "Overview" }
                        a href="/workers" { "Workers" }
                        form.lookup action="/tasks" method="get" {
                            input type="search" name="uuid" placeholder="task or group id" aria-label="task id";
                            button type="submit" { "Find task" }
                        }
                    }
                    span.broker title="broker (credentials hidden)" { (web.broker_label()) }
                    @if web.auth.has_token() {
                        form.logout action="/logout" method="post" {
                            input type="hidden" name="csrf" value=(web.auth.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                @if web.in_process {
                    p.notice.warn id="in-process" {
                        "This dashboard is configured with the in-process memory:// broker, so there is nothing to \
                         inspect: no other process can reach its queues. Start it with the broker your workers \
                         use (BROKER=redis://…, -c config.yaml, or --broker URL)."
                    }
                }
                p #flash.notice role="status" hidden {}
                main data-live=(if live { "on" } else { "off" }) data-every=(every_ms) {
                    (body)
                }
                dialog #confirm {
                    form method="dialog" {
                        p.message {}
                        menu {
                            button value="cancel" id="confirm-cancel" { "Cancel" }
                            button value="ok" id="confirm-ok" { "Confirm" }
                        }
                    }
                }
            }
        }
    }
}

/// A page-level error box (the page's own data could not be read).
pub(crate) fn error_box(error: &WebError) -> Markup {
    html! { p.notice.error { (error.to_string()) } }
}

/// The login form (with a token set).
pub(crate) fn login_page(web: &Shared, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Log in · machinery" }
                link rel="stylesheet" href="/assets/app.css";
            }
            body.login {
                main {
                    h1 { "machinery" }
                    p { "This dashboard needs the token it was started with (" code { "--token" } " or "
                        code { "MACHINERY_WEB_TOKEN" } ")." }
                    @if let Some(error) = error { p.notice.error { (error) } }
                    form action="/login" method="post" {
                        label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
                        button type="submit" { "Log in" }
                    }
                    @if !web.auth.has_token() { p { "(No token is set.)" } }
                }
            }
        }
    }
}

/// `GET /`: every queue's counts and rates, and charts of the last hour.
pub(crate) async fn overview(State(web): State<Shared>) -> Response {
    let rows = if web.in_process {
        Ok(Vec::new())
    } else {
        api::queue_rows(&web).await
    };
    let rabbit_why = "RabbitMQ does not tell this over AMQP (see docs/amqp.md)";
    let now = Utc::now().timestamp_millis();
    let history = web.sampler.all();
    // The busiest queues get a line each (eight at most, by their latest depth).
    let mut busiest: Vec<(&String, &Vec<sampler::Sample>)> = history.iter().collect();
    busiest.sort_by_key(|(_, h)| std::cmp::Reverse(h.last().map_or(0, |s| s.pending)));
    let depth: Vec<Series> = busiest
        .iter()
        .take(8)
        .map(|(queue, samples)| Series {
            label: (*queue).clone(),
            points: samples
                .iter()
                .map(|s| (s.at_ms, s.pending as f64))
                .collect(),
        })
        .collect();
    let throughput = throughput_series(history.values().map(Vec::as_slice));
    let window = window(&depth, now, sampler::HOUR.as_millis() as i64);
    let body = html! {
        h1 { "Queues" }
        @match &rows {
            Err(error) => (error_box(error)),
            Ok(rows) => {
                table #queues {
                    thead { tr {
                        th { "Queue" } th.n { "Pending" } th.n { "Delayed" } th.n { "In flight" }
                        th.n { "Dead" } th.n { "Succeeded/min" } th.n { "Failed/min" }
                    } }
                    tbody {
                        @for (stats, Rates { succeeded, failed }) in rows {
                            tr data-queue=(stats.queue) {
                                td { a href=(queue_page::queue_path(&stats.queue)) { (cut(&stats.queue)) } }
                                td.n data-field="pending" { (stats.pending) }
                                td.n data-field="delayed" { (count(stats.delayed, rabbit_why)) }
                                td.n data-field="in_flight" { (count(stats.in_flight, rabbit_why)) }
                                td.n data-field="dead" {
                                    @if stats.dead.unwrap_or(0) > 0 {
                                        a.bad href=(format!("{}#dead", queue_page::queue_path(&stats.queue))) {
                                            (count(stats.dead, rabbit_why)) }
                                    } @else { (count(stats.dead, rabbit_why)) }
                                }
                                td.n data-field="succeeded_per_min" { (rate(*succeeded)) }
                                td.n data-field="failed_per_min" { (rate(*failed)) }
                            }
                        }
                    }
                }
                @if web.broker().kind() == "amqp" {
                    p.note { "RabbitMQ cannot list its queues over AMQP: this shows the default queue and those \
                              named with " code { "--queue" } ". Delayed and in-flight counts are not told over \
                              AMQP either." }
                }
            }
        }
        section.charts {
            (line_chart("depth-chart", "Pending messages", &depth, now, window))
            (line_chart("throughput-chart", "Tasks finished per minute, all queues", &throughput, now, window))
        }
    };
    layout(&web, "Overview", true, body).into_response()
}

/// Succeeded and failed per minute over time, summed over `histories`.
pub(crate) fn throughput_series<'a>(
    histories: impl Iterator<Item = &'a [sampler::Sample]>,
) -> Vec<Series> {
    let mut succeeded: std::collections::BTreeMap<i64, f64> = Default::default();
    let mut failed: std::collections::BTreeMap<i64, f64> = Default::default();
    let mut any = false;
    for samples in histories {
        for (i, s) in samples.iter().enumerate().skip(1) {
            let r = sampler::rates(&samples[..=i]);
            // Samples of one round share their time to the millisecond only per queue: bucket by second.
            let at = s.at_ms / 1000 * 1000;
            if let Some(v) = r.succeeded {
                any = true;
                *succeeded.entry(at).or_default() += v;
            }
            if let Some(v) = r.failed {
                *failed.entry(at).or_default() += v;
            }
        }
    }
    if !any {
        return Vec::new();
    }
    vec![
        Series {
            label: "succeeded".into(),
            points: succeeded.into_iter().collect(),
        },
        Series {
            label: "failed".into(),
            points: failed.into_iter().collect(),
        },
    ]
}

/// `GET /workers`: the workers from their heartbeats.
pub(crate) async fn workers(State(web): State<Shared>) -> Response {
    let workers = if web.in_process {
        Ok(Vec::new())
    } else {
        api::worker_list(&web).await
    };
    let body = html! {
        h1 { "Workers" }
        @match &workers {
            Err(error) => (error_box(error)),
            Ok(workers) if workers.is_empty() => p.note { "No worker has a heartbeat on this broker." },
            Ok(workers) => {
                table #workers {
                    thead { tr {
                        th { "Status" } th { "Queue" } th { "Consumer" } th { "Host" } th.n { "PID" }
                        th.n { "Concurrency" } th.n { "Running" } th.n { "Processed" } th.n { "Failed" }
                        th.n { "In flight" } th { "Last beat" }
                    } }
                    tbody {
                        @for w in workers {
                            @let card = w.card.as_ref();
                            tr data-consumer=(w.consumer_tag) class=(if w.alive { "alive" } else { "gone" }) {
                                td { @if w.alive { span.good { "alive" } } @else { span.bad { "gone" } } }
                                td { a href=(queue_page::queue_path(&w.queue)) { (cut(&w.queue)) } }
                                td { code { (cut(&w.consumer_tag)) } }
                                td { (card.map_or("–".to_owned(), |c| cut(&c.host))) }
                                td.n { (card.map_or("–".to_owned(), |c| c.pid.to_string())) }
                                td.n { (card.map_or("–".to_owned(), |c| c.concurrency.to_string())) }
                                td.n { (card.map_or("–".to_owned(), |c| c.running.to_string())) }
                                td.n { (card.map_or("–".to_owned(), |c| (c.succeeded + c.failed).to_string())) }
                                td.n { (card.map_or("–".to_owned(), |c| c.failed.to_string())) }
                                td.n { (w.in_flight) }
                                td { (w.heartbeat_age.map_or("–".to_owned(), ago)) }
                            }
                        }
                    }
                }
                p.note { "A worker whose heartbeat lapsed is shown as gone for five minutes after its last \
                          beat (longer while it still holds messages that a live worker of its queue has not \
                          yet put back), then dropped." }
            }
        }
    };
    let status = match &workers {
        Err(WebError::Unsupported { .. }) | Ok(_) => StatusCode::OK,
        Err(e) => e.status(),
    };
    (status, layout(&web, "Workers", true, body)).into_response()
}
