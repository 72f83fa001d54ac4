//! The commands: each asks the broker or the result backend one question and prints the answer as a table
//! (people) or JSON (scripts).

use std::collections::BTreeSet;
use std::io::{BufRead as _, IsTerminal as _};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use machinery::backend::{self, Backend};
use machinery::broker::{self, Broker, BrokerError, Inspect};
use machinery::wire::gotime;
use machinery::{Config, Server, Signature, State, TaskState};
use serde_json::{json, Value};

use crate::cli::{Cli, Command, Global};
use crate::error::CliError;
use crate::message::{result_summary, when, Message};
use crate::output::{escape, print, print_json, truncate, Cell, Paint, Style, Table};
use crate::report::{self, state_json, why_unsupported};

/// Widest argument summary and reason in a table (JSON has them whole).
const CELL_MAX: usize = 60;

/// The configuration: the file given with `-c`, else Go's environment variables; then the URL flags.
pub(crate) fn load_config(global: &Global) -> Result<Config, CliError> {
    let mut config = match &global.config {
        Some(path) => Config::from_file(path)?,
        None => Config::from_env()?,
    };
    if let Some(url) = &global.broker {
        config.broker = url.clone();
    }
    if let Some(url) = &global.backend {
        config.result_backend = url.clone();
    }
    Ok(config)
}

/// Refuses the in-process broker: every command asks about queues that other processes use, and no
/// other process can reach this one's `memory://` queues.
fn refuse_in_process_broker(config: &Config, global: &Global) -> Result<(), CliError> {
    if !config.broker.trim_start().starts_with("memory:") {
        return Ok(());
    }
    let hint = if global.broker.is_none() && config.broker_is_in_process_by_default() {
        "BROKER is not set: set it (for example BROKER=redis://localhost:6379) or pass --broker URL"
    } else {
        "Name the broker your workers use with BROKER, -c FILE or --broker URL"
    };
    Err(CliError::InProcessBroker {
        broker: config.broker.clone(),
        hint,
    })
}

/// Runs one command line.
pub(crate) async fn run(cli: Cli) -> Result<(), CliError> {
    let config = load_config(&cli.global)?;
    let command = match cli.command {
        // The dashboard says on every page that an in-process broker has nothing to show.
        Command::Web(args) => return crate::web::serve(config, args).await,
        command => command,
    };
    refuse_in_process_broker(&config, &cli.global)?;
    let app = App {
        config,
        json: cli.global.json,
        style: Style::detect(),
    };
    match command {
        Command::Queues { queues } => app.queues(queues).await,
        Command::Task { uuid } => app.task(&uuid).await,
        Command::Pending { queue, limit } => app.pending(&queue, limit).await,
        Command::Delayed { limit } => app.delayed(limit).await,
        Command::Dead { queue, limit } => app.dead(&queue, limit).await,
        Command::Requeue { queue, uuid, .. } => app.requeue(&queue, uuid.as_deref()).await,
        Command::Purge { queue, yes } => app.purge(&queue, yes).await,
        Command::Send {
            task,
            args,
            queue,
            eta,
            countdown,
            priority,
            retries,
            wait,
        } => {
            let mut signature = Signature::with_args(task, args.0);
            if let Some(queue) = queue {
                signature = signature.routing_key(queue);
            }
            if let Some(eta) = eta {
                signature = signature.eta(eta);
            }
            if let Some(secs) = countdown {
                signature = signature.countdown(Duration::from_secs(secs));
            }
            if let Some(priority) = priority {
                signature = signature.priority(priority);
            }
            if let Some(retries) = retries {
                signature = signature.retries(retries);
            }
            app.send(signature, wait.map(Duration::from_secs_f64)).await
        }
        Command::Workers => app.workers().await,
        Command::Web(_) => Ok(()),
    }
}

struct App {
    config: Config,
    json: bool,
    style: Style,
}

impl App {
    async fn broker(&self) -> Result<Arc<dyn Broker>, CliError> {
        broker::connect(&self.config)
            .await
            .map_err(CliError::Connect)
    }

    async fn backend(&self) -> Result<Arc<dyn Backend>, CliError> {
        backend::connect(&self.config)
            .await
            .map_err(CliError::Connect)
    }

    /// The broker's inspection commands, or the command's error for a broker that has none.
    fn inspect(broker: &dyn Broker) -> Result<&dyn Inspect, CliError> {
        broker.inspect().map_err(Self::broker_error(
            broker,
            "inspecting the broker".to_owned(),
        ))
    }

    /// Turns a broker error into the command's error, explaining an unsupported operation.
    fn broker_error(
        broker: &dyn Broker,
        what: String,
    ) -> impl FnOnce(BrokerError) -> CliError + '_ {
        move |error| match error {
            BrokerError::Unsupported { operation, .. } => CliError::Unsupported {
                what,
                broker: broker.kind(),
                why: why_unsupported(broker.kind(), operation),
            },
            source => CliError::Broker { what, source },
        }
    }

    async fn queues(&self, named: Vec<String>) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let queues: Vec<String> = if named.is_empty() {
            match Self::inspect(broker.as_ref())?.queues().await {
                Ok(queues) => queues,
                Err(BrokerError::Unsupported { operation, .. }) => {
                    eprintln!(
                        "note: the {kind} broker cannot list queues: {why}. Showing the default queue {queue:?}; name others with --queue.",
                        kind = broker.kind(),
                        why = why_unsupported(broker.kind(), operation),
                        queue = self.config.default_queue,
                    );
                    vec![self.config.default_queue.clone()]
                }
                Err(source) => {
                    return Err(CliError::Broker {
                        what: "listing queues".to_owned(),
                        source,
                    })
                }
            }
        } else {
            // Keep the order given, without repeats.
            let mut seen = BTreeSet::new();
            named
                .into_iter()
                .filter(|q| seen.insert(q.clone()))
                .collect()
        };
        let mut stats = Vec::with_capacity(queues.len());
        for queue in &queues {
            let what = format!("counting the messages of queue {queue:?}");
            stats.push(
                Self::inspect(broker.as_ref())?
                    .queue_stats(queue)
                    .await
                    .map_err(Self::broker_error(broker.as_ref(), what))?,
            );
        }
        if self.json {
            let rows: Vec<Value> = stats.iter().map(report::queue_json).collect();
            return Ok(print_json(&Value::Array(rows))?);
        }
        let mut table = Table::new(&["QUEUE", "PENDING", "DELAYED", "IN-FLIGHT", "DEAD"]);
        for s in &stats {
            let dead = Cell::count(s.dead);
            table.row(vec![
                Cell::text(&s.queue),
                Cell::count(Some(s.pending)),
                Cell::count(s.delayed),
                Cell::count(s.in_flight),
                if s.dead.unwrap_or(0) > 0 {
                    dead.paint(Paint::Red)
                } else {
                    dead
                },
            ]);
        }
        Ok(print(&table.render(self.style))?)
    }

    async fn task(&self, uuid: &str) -> Result<(), CliError> {
        let backend = self.backend().await?;
        let state = backend
            .get_state(uuid)
            .await
            .map_err(|source| CliError::Backend {
                what: format!("reading the state of task {uuid}"),
                source,
            })?
            .ok_or_else(|| {
                CliError::NotFound(format!(
                    "task {uuid}: no state in the {} result backend (a wrong id, or the result expired: \
                     results are kept {} s)",
                    backend.kind(),
                    self.config.results_expire_in_secs()
                ))
            })?;
        if self.json {
            return Ok(print_json(&state_json(&state))?);
        }
        Ok(print(&self.state_text(&state))?)
    }

    /// A state as a block of `Label: value` lines.
    fn state_text(&self, state: &TaskState) -> String {
        let paint = match state.state {
            State::Success => Some(Paint::Green),
            State::Failure => Some(Paint::Red),
            State::Pending | State::Retry => Some(Paint::Yellow),
            _ => None,
        };
        let mut lines = vec![
            ("Task", escape(&state.task_uuid)),
            (
                "Name",
                if state.task_name.is_empty() {
                    "-".to_owned()
                } else {
                    escape(&state.task_name)
                },
            ),
            ("State", self.style.paint(state.state.as_str(), paint)),
            ("Created", when(&state.created_at, Utc::now())),
        ];
        match &state.results {
            None => lines.push(("Results", "-".to_owned())),
            Some(results) if results.is_empty() => {
                lines.push(("Results", "(none)".to_owned()));
            }
            Some(results) => {
                for (i, result) in results.iter().enumerate() {
                    lines.push((
                        if i == 0 { "Results" } else { "" },
                        escape(&result_summary(result)),
                    ));
                }
            }
        }
        if let Some(progress) = &state.progress {
            lines.push(("Progress", escape(&progress.to_string())));
        }
        if !state.error.is_empty() {
            lines.push((
                "Error",
                self.style.paint(&escape(&state.error), Some(Paint::Red)),
            ));
        }
        let mut out = String::new();
        for (label, value) in lines {
            let label = if label.is_empty() {
                String::new()
            } else {
                format!("{label}:")
            };
            out.push_str(&format!("{label:<8} {value}\n"));
        }
        out
    }

    async fn pending(&self, queue: &str, limit: usize) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let bodies = Self::inspect(broker.as_ref())?
            .pending(queue, limit)
            .await
            .map_err(Self::broker_error(
                broker.as_ref(),
                format!("listing the messages of queue {queue:?}"),
            ))?;
        let messages: Vec<Message> = bodies.iter().map(|b| Message::decode(b)).collect();
        if self.json {
            let rows = messages.iter().map(Message::to_json).collect();
            return Ok(print_json(&Value::Array(rows))?);
        }
        let mut table = Table::new(&["#", "UUID", "NAME", "ARGS"]);
        for (i, m) in messages.iter().enumerate() {
            table.row(vec![
                Cell::count(Some(i as u64 + 1)).paint(Paint::Dim),
                Cell::text(m.uuid()),
                Cell::text(m.name()),
                Cell::text(truncate(&m.args_summary(), CELL_MAX)),
            ]);
        }
        Ok(print(&table.render(self.style))?)
    }

    async fn delayed(&self, limit: usize) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let delayed = Self::inspect(broker.as_ref())?
            .delayed(limit)
            .await
            .map_err(Self::broker_error(
                broker.as_ref(),
                "listing delayed messages".to_owned(),
            ))?;
        let rows: Vec<(DateTime<Utc>, Message)> = delayed
            .iter()
            .map(|d| (d.eta, Message::decode(&d.body)))
            .collect();
        if self.json {
            let rows = delayed.iter().map(report::delayed_json).collect();
            return Ok(print_json(&Value::Array(rows))?);
        }
        let now = Utc::now();
        let mut table = Table::new(&["DUE", "QUEUE", "UUID", "NAME", "ARGS"]);
        for (eta, m) in &rows {
            let queue = match m.routing_key() {
                "-" => self.config.default_queue.as_str(),
                key => key,
            };
            table.row(vec![
                Cell::text(when(eta, now)).paint(Paint::Yellow),
                Cell::text(queue),
                Cell::text(m.uuid()),
                Cell::text(m.name()),
                Cell::text(truncate(&m.args_summary(), CELL_MAX)),
            ]);
        }
        Ok(print(&table.render(self.style))?)
    }

    async fn dead(&self, queue: &str, limit: usize) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let letters = Self::inspect(broker.as_ref())?
            .dead_letters(queue, limit)
            .await
            .map_err(Self::broker_error(
                broker.as_ref(),
                format!("listing the dead letters of queue {queue:?}"),
            ))?;
        if self.json {
            let rows = letters.iter().map(report::dead_letter_json).collect();
            return Ok(print_json(&Value::Array(rows))?);
        }
        let now = Utc::now();
        let mut table = Table::new(&["AT", "UUID", "NAME", "REASON"]);
        for letter in &letters {
            let m = Message::decode(&letter.body);
            table.row(vec![
                Cell::text(when(&letter.at, now)),
                Cell::text(m.uuid()),
                Cell::text(m.name()),
                Cell::text(truncate(&letter.reason, CELL_MAX)).paint(Paint::Red),
            ]);
        }
        Ok(print(&table.render(self.style))?)
    }

    async fn requeue(&self, queue: &str, uuid: Option<&str>) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let moved = Self::inspect(broker.as_ref())?
            .requeue_dead(queue, uuid)
            .await
            .map_err(Self::broker_error(
                broker.as_ref(),
                format!("requeueing the dead letters of queue {queue:?}"),
            ))?;
        if let (Some(uuid), 0) = (uuid, moved) {
            return Err(CliError::NotFound(format!(
                "queue {queue:?} has no dead letter of task {uuid}"
            )));
        }
        if self.json {
            return Ok(print_json(&json!({"queue": queue, "requeued": moved}))?);
        }
        let noun = if moved == 1 {
            "dead letter"
        } else {
            "dead letters"
        };
        Ok(print(&format!(
            "requeued {moved} {noun} onto queue {queue}\n"
        ))?)
    }

    async fn purge(&self, queue: &str, yes: bool) -> Result<(), CliError> {
        if !yes {
            if !std::io::stdin().is_terminal() {
                return Err(CliError::Usage(format!(
                    "purge deletes every message waiting in queue {queue:?}; pass --yes to confirm (stdin \
                     is not a terminal, so there is no one to ask)"
                )));
            }
            eprint!("Delete every message waiting in queue {queue:?}? [y/N] ");
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                eprintln!("nothing deleted");
                return Ok(());
            }
        }
        let broker = self.broker().await?;
        let purged =
            Self::inspect(broker.as_ref())?
                .purge(queue)
                .await
                .map_err(Self::broker_error(
                    broker.as_ref(),
                    format!("purging queue {queue:?}"),
                ))?;
        if self.json {
            return Ok(print_json(&json!({"queue": queue, "purged": purged}))?);
        }
        let noun = if purged == 1 { "message" } else { "messages" };
        Ok(print(&format!(
            "purged {purged} {noun} from queue {queue}\n"
        ))?)
    }

    async fn send(&self, signature: Signature, wait: Option<Duration>) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let backend = self.backend().await?;
        let queue = broker.route(&signature.routing_key);
        let eta = signature.eta;
        let name = signature.name.clone();
        let server = Server::from_parts(self.config.clone(), broker, backend.clone());
        let result = server.send(signature).await?;
        let uuid = result.uuid().to_owned();
        let state = match wait {
            None => None,
            Some(timeout) => Some(backend.wait_for_completion(&uuid, timeout).await.map_err(
                |source| CliError::Backend {
                    what: format!("waiting for task {uuid}"),
                    source,
                },
            )?),
        };
        if self.json {
            let mut out = json!({
                "uuid": uuid,
                "name": name,
                "queue": queue,
                "eta": eta.as_ref().map(gotime::format),
            });
            if let Some(state) = &state {
                out["state"] = state.as_ref().map_or(Value::Null, state_json);
            }
            print_json(&out)?;
        } else {
            let due = eta.map_or_else(String::new, |eta| {
                format!(", due {}", when(&eta, Utc::now()))
            });
            let mut text = format!("sent {name} {uuid} to queue {queue}{due}\n");
            if let Some(Some(state)) = &state {
                text.push_str(&self.state_text(state));
            }
            print(&text)?;
        }
        match (wait, state) {
            (Some(timeout), Some(state)) => match state {
                Some(s) if s.state == State::Failure => {
                    Err(CliError::Task(format!("task {uuid} failed: {}", s.error)))
                }
                Some(s) if s.state == State::Success => Ok(()),
                last => Err(CliError::Task(format!(
                    "task {uuid} did not finish within {:.1} s (last state: {})",
                    timeout.as_secs_f64(),
                    last.map_or_else(|| "none stored".to_owned(), |s| s.state.to_string())
                ))),
            },
            _ => Ok(()),
        }
    }

    async fn workers(&self) -> Result<(), CliError> {
        let broker = self.broker().await?;
        let workers =
            Self::inspect(broker.as_ref())?
                .workers()
                .await
                .map_err(Self::broker_error(
                    broker.as_ref(),
                    "listing workers".to_owned(),
                ))?;
        if self.json {
            let rows = workers.iter().map(report::worker_json).collect();
            return Ok(print_json(&Value::Array(rows))?);
        }
        let mut table = Table::new(&["QUEUE", "CONSUMER", "STATUS", "IN-FLIGHT", "HEARTBEAT"]);
        for w in &workers {
            table.row(vec![
                Cell::text(&w.queue),
                Cell::text(&w.consumer_tag),
                if w.alive {
                    Cell::text("alive").paint(Paint::Green)
                } else {
                    Cell::text("dead").paint(Paint::Red)
                },
                Cell::count(Some(w.in_flight)),
                Cell::text(w.heartbeat_age.map_or_else(|| "-".to_owned(), age)),
            ]);
        }
        Ok(print(&table.render(self.style))?)
    }
}

/// `0.4s ago`, `12s ago`, `3m ago`.
fn age(age: Duration) -> String {
    let secs = age.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1}s ago")
    } else if secs < 120.0 {
        format!("{}s ago", secs as u64)
    } else {
        format!("{}m ago", secs as u64 / 60)
    }
}
