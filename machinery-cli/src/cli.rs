//! The command line: global options and one subcommand per question an operator asks.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand};
use machinery::args::TypeTag;
use machinery::Arg;

/// Inspect and operate a machinery task queue: queues, tasks, dead letters, workers.
///
/// Configured like a worker: Go machinery's environment variables (BROKER, RESULT_BACKEND,
/// DEFAULT_QUEUE, REDIS_*, AMQP_*, ...), or a YAML/TOML file with -c; --broker and --backend override
/// either. Exit status: 0 ok, 1 operational error (the message on stderr says what failed), 2 usage
/// error.
#[derive(Debug, Parser)]
#[command(name = "machinery", version)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Configuration file (.yaml, .yml or .toml) instead of the environment variables
    #[arg(short, long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Broker URL (redis://host:6379/0, amqp://user:pass@host:5672/), overriding the configuration.
    /// The in-process memory:// broker is refused (`web` says so on every page): no other process can
    /// reach it
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) broker: Option<String>,
    /// Result backend URL, overriding the configuration
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) backend: Option<String>,
    /// Print JSON (for scripts) instead of tables
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Each queue with its pending, delayed, in-flight and dead-letter counts
    #[command(
        long_about = "Each queue with its pending, delayed, in-flight and dead-letter counts.

Which queues: with --queue, exactly those. Without, the ones the broker can find:
  redis   the default queue (DEFAULT_QUEUE); queues with a consumer registry
          (machinery:consumers:<queue>), an in-flight list (machinery:inflight:<queue>:<consumer>)
          or a dead-letter list (<queue>.dead); every other list whose first message is a task
          (found with SCAN, which walks the whole database in steps without blocking it); and the
          routing keys of the tasks in the delayed-task set. An empty queue is only found while a
          worker is registered on it, since Redis deletes empty lists.
  amqp    AMQP cannot list queues (RabbitMQ's management HTTP API can): the default queue only;
          name the others with --queue.

A count the broker cannot know is shown as '-' (null in JSON): RabbitMQ keeps delayed messages in
per-delay queues and does not count unacknowledged ones per queue over AMQP. Counting the delayed
messages of a queue on Redis reads the whole delayed-task set (shared by all queues)."
    )]
    Queues {
        /// A queue to show (repeat for several); turns discovery off
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
    },
    /// A task's state from the result backend, with its decoded results
    Task {
        /// The task id (task_…)
        uuid: String,
    },
    /// Messages waiting in a queue, oldest first, without taking them
    #[command(
        long_about = "Messages waiting in a queue, oldest first, without taking them.

On AMQP the messages are read with basic.get and handed back at once, so a worker sees them a moment
later and marked redelivered."
    )]
    Pending {
        /// The queue (Redis list, AMQP queue)
        queue: String,
        /// Show at most this many
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Messages waiting for their ETA, of every queue, earliest first
    #[command(
        long_about = "Messages waiting for their ETA, of every queue, earliest first.

Redis keeps them in one sorted set (REDIS_DELAYED_TASKS_KEY, default delayed_tasks) for all queues.
AMQP cannot answer: RabbitMQ parks delayed messages in per-delay queues whose names it cannot list,
and reading a message there means taking it."
    )]
    Delayed {
        /// Show at most this many
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Dead letters of a queue (messages the workers gave up on), with the reasons
    Dead {
        /// The queue whose dead letters to show (they sit in <queue>.dead)
        queue: String,
        /// Show at most this many
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Moves dead letters back to the tail of their queue, unchanged
    #[command(
        group(ArgGroup::new("which").required(true).args(["all", "uuid"])),
        long_about = "Moves dead letters back to the tail of their queue, unchanged.

On Redis each message moves in one step (removed from <queue>.dead and pushed onto the queue by
one script), so none is lost or doubled even if two operators requeue at once. A message that still
cannot be handled (its task is still unknown, its JSON still broken) is dead-lettered again."
    )]
    Requeue {
        /// The queue whose dead letters to move back
        queue: String,
        /// Every dead letter present now
        #[arg(long)]
        all: bool,
        /// Only the dead letters of this task id
        uuid: Option<String>,
    },
    /// Deletes every message waiting in a queue (not the delayed ones, not the dead letters)
    Purge {
        /// The queue to empty
        queue: String,
        /// Do not ask (required when stdin is not a terminal)
        #[arg(short, long)]
        yes: bool,
    },
    /// Sends a task by name, with Go-typed arguments
    #[command(
        long_about = "Sends a task by name, with Go-typed arguments, as any sender does: the \
PENDING state is stored, then the message is published.

Example:
  machinery send add --args '[{\"Type\":\"int64\",\"Value\":1},{\"Type\":\"int64\",\"Value\":2}]' --wait 10

With --wait, the exit status is 1 if the task fails or does not finish in time."
    )]
    Send {
        /// The registered task name
        task: String,
        /// The arguments as machinery JSON: [{"Type":"int64","Value":1}, {"Name":"s","Type":"string","Value":"x"}]
        #[arg(long, default_value = "[]", value_parser = parse_args, value_name = "JSON")]
        args: TaskArgs,
        /// The queue (routing key); the default queue when not given
        #[arg(long)]
        queue: Option<String>,
        /// Run no earlier than this time (RFC 3339, e.g. 2030-01-01T12:00:00Z)
        #[arg(long, value_parser = parse_eta, conflicts_with = "countdown", value_name = "TIME")]
        eta: Option<DateTime<Utc>>,
        /// Run no earlier than this many seconds from now
        #[arg(long, value_name = "SECS")]
        countdown: Option<u64>,
        /// AMQP message priority
        #[arg(long)]
        priority: Option<u8>,
        /// Retries after a failure
        #[arg(long)]
        retries: Option<u32>,
        /// Wait up to this many seconds for the result and print it
        #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
        wait: Option<f64>,
    },
    /// Live (and dead, not yet recovered) workers from their heartbeats: consumer tag, queue,
    /// in-flight count, heartbeat age
    #[command(
        long_about = "Workers from their heartbeats: consumer tag, queue, in-flight count, heartbeat age.

On Redis every consumer registers in machinery:consumers:<queue> and renews
machinery:heartbeat:<queue>:<consumer>. A consumer whose heartbeat expired is shown as dead until a
live worker on its queue has put its in-flight messages back on the queue. AMQP cannot answer:
consumers are listed only by RabbitMQ's management API or rabbitmqctl list_consumers."
    )]
    Workers,
    /// A web dashboard: queues, workers, tasks and dead letters in a browser (see docs/web.md)
    #[command(
        long_about = "A web dashboard: queues with their counts and charts of the last hour, workers, \
a task by id, and each queue's pending, delayed and dead messages with actions (requeue, delete, purge, \
revoke). Server-rendered pages and a JSON API under /api.

It listens on 127.0.0.1:5555 by default. Any other address needs a token (--token or \
MACHINERY_WEB_TOKEN): every page and API call then asks for it (a login form that sets a cookie, or \
Authorization: Bearer <token>). Actions are POST requests with a CSRF token; a GET never changes \
anything."
    )]
    Web(WebArgs),
}

/// The options of `machinery web`.
#[derive(Debug, Args)]
pub(crate) struct WebArgs {
    /// The address to serve on; anything but loopback needs --token
    #[arg(long, default_value = "127.0.0.1:5555", value_name = "ADDR")]
    pub(crate) listen: String,
    /// The token every request must carry (required when --listen is not loopback)
    #[arg(
        long,
        env = "MACHINERY_WEB_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,
    /// Seconds between two samples of the queues for the charts (an hour of them is kept)
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300), value_name = "SECS")]
    pub(crate) sample_every: u64,
    /// A queue to show besides those the broker finds (repeat for several; on RabbitMQ, which cannot
    /// list queues, the only way to show more than the default queue)
    #[arg(long = "queue", value_name = "QUEUE")]
    pub(crate) queues: Vec<String>,
}

/// The arguments of `send --args`, checked for known Go type tags.
#[derive(Debug, Clone)]
pub(crate) struct TaskArgs(pub(crate) Vec<Arg>);

fn parse_args(text: &str) -> Result<TaskArgs, String> {
    let args: Vec<Arg> = serde_json::from_str(text).map_err(|e| {
        format!("expected a JSON array of {{\"Type\": ..., \"Value\": ...}} objects: {e}")
    })?;
    for (i, arg) in args.iter().enumerate() {
        if TypeTag::parse(&arg.type_tag).is_none() {
            return Err(format!(
                "argument {}: unknown type {:?}; expected a Go type such as int64, float64, string, \
                 bool, []int64, []string, []uint8, or json",
                i + 1,
                arg.type_tag
            ));
        }
    }
    Ok(TaskArgs(args))
}

fn parse_eta(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2030-01-01T12:00:00Z: {e}"))
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Ok(secs),
        _ => Err("expected a number of seconds, e.g. 10 or 0.5".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn args_are_checked_for_known_go_types() {
        let args = parse_args(
            r#"[{"Type":"int64","Value":1},{"Name":"s","Type":"[]string","Value":["a"]}]"#,
        )
        .unwrap()
        .0;
        assert_eq!(args.len(), 2);
        assert_eq!(args[1].name, "s");
        let err = parse_args(r#"[{"Type":"integer","Value":1}]"#).unwrap_err();
        assert!(
            err.contains("argument 1: unknown type \"integer\""),
            "{err}"
        );
        assert!(parse_args("{").unwrap_err().contains("JSON array"));
    }

    #[test]
    fn requeue_needs_all_or_a_uuid_but_not_both() {
        assert!(Cli::try_parse_from(["machinery", "requeue", "q"]).is_err());
        assert!(Cli::try_parse_from(["machinery", "requeue", "q", "--all", "task_1"]).is_err());
        assert!(Cli::try_parse_from(["machinery", "requeue", "q", "--all"]).is_ok());
        assert!(Cli::try_parse_from(["machinery", "requeue", "q", "task_1"]).is_ok());
    }
}
