//! The task message: Go machinery's `tasks.Signature`, its `Arg`s and `Headers`.
//!
//! [`Signature<T>`] is both the wire struct and the typed handle users build with `my_task::signature(..)`:
//! `T` is the Rust type the task returns, so sending it gives an [`AsyncResult<T>`](crate::AsyncResult). It
//! serializes with Go's exact keys, in Go's order, every key present; it reads Go's JSON tolerantly (keys in
//! any case, `null`s, unknown keys). The default `T = serde_json::Value` is the untyped form used for
//! callbacks nested in other messages and for messages built by task name.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeSeed as _;
use serde_json::Value;

pub use super::arg::{Arg, MAX_VALUE_DEPTH};

mod read;
mod write;

/// The free-form `Headers` map of a signature. Go's tracing stores string values here; we keep every
/// value, understood or not, when a message is re-published.
pub type Headers = serde_json::Map<String, Value>;

/// The header in which workers count how often they put back a message whose task they do not know
/// (bounded by `Config::unknown_task_requeues`, then the message is dead-lettered).
pub const UNKNOWN_TASK_REQUEUES_HEADER: &str = "machinery_unknown_task_requeues";

/// The header carrying a per-message time limit in milliseconds, set by [`Signature::timeout`]. Go
/// workers ignore it.
pub const TIME_LIMIT_HEADER: &str = "machinery_time_limit_ms";

/// The header counting the retries already made, for back-off strategies. Go workers keep it unchanged.
pub const RETRY_ATTEMPT_HEADER: &str = "machinery_retry_attempt";

/// The header counting how often a worker put a message back because a follow-up of its task (a
/// callback, the next step of a chain, a chord callback) could not be published. Go workers ignore it.
pub const FOLLOW_UP_ATTEMPTS_HEADER: &str = "machinery_follow_up_attempts";

/// Set (`true`) on a group member's message that a worker put back after this member completed its
/// chord but the chord callback could not be published: the next run sends the callback without asking
/// the backend again (which says yes only once). Go workers ignore it.
pub const CHORD_ELECTED_HEADER: &str = "machinery_chord_elected";

/// Set (`true`) on a follow-up (a callback, the next step of a chain, a chord callback) sent by a task
/// whose message came more than once (redelivered, or put back): the follow-up may have been sent before,
/// so the worker that receives it looks up its state first and, if its SUCCESS is stored, does not run it
/// again. Go workers ignore it.
pub const SENT_AGAIN_HEADER: &str = "machinery_sent_again";

/// The header carrying the instant after which a task that has not started is never run (RFC 3339, UTC),
/// set by [`Signature::expires_at`] and [`Signature::expires_in`]. Go workers ignore it and run the task.
pub const EXPIRES_HEADER: &str = "machinery_expires_at";

/// The header asking for a unique task: how long (milliseconds) the same task name with the same
/// arguments is not queued again while this one is pending or running. Set by
/// [`Signature::unique_for`] and `#[task(unique_for = "..")]`.
pub const UNIQUE_FOR_HEADER: &str = "machinery_unique_for_ms";

/// The header with the unique-task key the sender claimed (from the task name and arguments), which the
/// worker releases when the task reaches its final state. Go workers ignore it.
pub const UNIQUE_KEY_HEADER: &str = "machinery_unique_key";

/// The header with the start a rate-limited task reserved (RFC 3339, UTC): a worker that fetched it
/// before then sent it back with that ETA, and runs it when it comes back without reserving again. Go
/// workers ignore it.
pub const RATE_SLOT_HEADER: &str = "machinery_rate_slot";

/// A task message, wire-compatible with Go machinery's `tasks.Signature`.
///
/// Build typed ones with the functions `#[task]` generates (`add::signature(1, 2)`), or untyped ones by
/// name with [`Signature::new`]. Builder methods set the options:
///
/// ```
/// use std::time::Duration;
/// use machinery::Signature;
///
/// let sig = Signature::new("add")
///     .routing_key("math")
///     .countdown(Duration::from_secs(5))
///     .retries(3)
///     .priority(7)
///     .header("tenant", "acme");
/// assert_eq!(sig.retry_count, 3);
/// assert!(sig.eta.is_some());
/// ```
pub struct Signature<T = Value> {
    /// The task id: `task_<uuid4>` (chord callbacks `chord_<uuid4>`); filled in when sent if empty.
    pub uuid: String,
    /// The registered task name the worker looks up.
    pub name: String,
    /// The queue (Redis list / AMQP routing key); empty means the default.
    pub routing_key: String,
    /// Run no earlier than this instant.
    pub eta: Option<DateTime<Utc>>,
    /// The group this task belongs to, `group_<uuid4>`, or empty.
    pub group_uuid: String,
    /// The number of tasks in that group.
    pub group_task_count: u32,
    /// The arguments, in parameter order.
    pub args: Vec<Arg>,
    /// Free-form headers; `None` is written as `null` (Go's nil map).
    pub headers: Option<Headers>,
    /// The AMQP message priority (0–255).
    pub priority: u8,
    /// If set, this task's results are not appended to the arguments of its `OnSuccess` callbacks.
    pub immutable: bool,
    /// How many more times the task is retried after a failure.
    pub retry_count: u32,
    /// The last retry delay in seconds; the next is the next Fibonacci number.
    pub retry_timeout: u32,
    /// Sent after success, with this task's results appended (unless it is immutable). Chains nest here.
    pub on_success: Vec<Signature>,
    /// Sent after the final failure, with the error text prepended as a `string` argument.
    pub on_error: Vec<Signature>,
    /// The chord callback, carried by every member of a chord's group.
    pub chord_callback: Option<Box<Signature>>,
    /// SQS FIFO message group id (kept for Go compatibility).
    pub broker_message_group_id: String,
    /// SQS receipt handle (kept for Go compatibility).
    pub sqs_receipt_handle: String,
    /// SQS: keep the message after a final failure (kept for Go compatibility).
    pub stop_task_deletion_on_error: bool,
    /// A worker that does not know this task drops the message instead of requeueing it.
    pub ignore_when_task_not_registered: bool,
    /// An argument that could not be encoded; `send` reports it.
    pub(crate) encode_error: Option<String>,
    _output: PhantomData<fn() -> T>,
}

impl Signature {
    /// An untyped signature for the task registered as `name`, with no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        Signature::with_args(name, Vec::new())
    }

    /// A signature for the task `name` with these arguments.
    pub fn with_args(name: impl Into<String>, args: Vec<Arg>) -> Self {
        let mut signature = Signature::blank();
        signature.name = name.into();
        signature.args = args;
        signature
    }

    /// Decodes a message from JSON, tolerantly (keys in any case, `null`s, unknown keys).
    ///
    /// A chain nests each step in the `OnSuccess` of the one before, and Go sends chains of thousands of
    /// steps, so serde_json's depth limit (128, i.e. 63 steps) is lifted here and the stack grows on the
    /// heap as nested signatures are read. Free-form values (argument values, `Headers`) keep a depth
    /// limit of their own ([`MAX_VALUE_DEPTH`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        match std::str::from_utf8(bytes) {
            // Checked once for the whole message, the text's strings are not checked one by one.
            Ok(text) => Self::read_json(serde_json::Deserializer::from_str(text)),
            // The byte reader's error says where the bad bytes are.
            Err(_) => Self::read_json(serde_json::Deserializer::from_slice(bytes)),
        }
    }

    /// Reads from text in memory (a string or a byte slice: the reads that can lend their input).
    fn read_json<'de, R: serde_json::de::Read<'de>>(
        mut de: serde_json::Deserializer<R>,
    ) -> Result<Self, serde_json::Error> {
        de.disable_recursion_limit();
        // The input is in memory: integer fields and `Headers` are read from borrowed text.
        let signature = read::Borrowing::<Value>::default().deserialize(&mut de)?;
        de.end()?;
        Ok(signature)
    }
}

impl<T> Signature<T> {
    /// A signature with every field empty (no name, no id, no arguments).
    pub(crate) fn blank() -> Self {
        Signature {
            uuid: String::new(),
            name: String::new(),
            routing_key: String::new(),
            eta: None,
            group_uuid: String::new(),
            group_task_count: 0,
            args: Vec::new(),
            headers: None,
            priority: 0,
            immutable: false,
            retry_count: 0,
            retry_timeout: 0,
            on_success: Vec::new(),
            on_error: Vec::new(),
            chord_callback: None,
            broker_message_group_id: String::new(),
            sqs_receipt_handle: String::new(),
            stop_task_deletion_on_error: false,
            ignore_when_task_not_registered: false,
            encode_error: None,
            _output: PhantomData,
        }
    }

    /// The same message with another output type.
    pub fn retype<U>(mut self) -> Signature<U> {
        use std::mem::take;
        Signature {
            uuid: take(&mut self.uuid),
            name: take(&mut self.name),
            routing_key: take(&mut self.routing_key),
            eta: self.eta,
            group_uuid: take(&mut self.group_uuid),
            group_task_count: self.group_task_count,
            args: take(&mut self.args),
            headers: self.headers.take(),
            priority: self.priority,
            immutable: self.immutable,
            retry_count: self.retry_count,
            retry_timeout: self.retry_timeout,
            on_success: take(&mut self.on_success),
            on_error: take(&mut self.on_error),
            chord_callback: self.chord_callback.take(),
            broker_message_group_id: take(&mut self.broker_message_group_id),
            sqs_receipt_handle: take(&mut self.sqs_receipt_handle),
            stop_task_deletion_on_error: self.stop_task_deletion_on_error,
            ignore_when_task_not_registered: self.ignore_when_task_not_registered,
            encode_error: self.encode_error.take(),
            _output: PhantomData,
        }
    }

    /// The untyped form, as nested callbacks carry it.
    pub fn erase(self) -> Signature {
        self.retype()
    }

    /// Sets the task id (normally generated when sent).
    pub fn with_uuid(mut self, uuid: impl Into<String>) -> Self {
        self.uuid = uuid.into();
        self
    }

    /// Sends the task to this queue (Redis list, AMQP routing key) instead of the default one.
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = key.into();
        self
    }

    /// Runs the task no earlier than `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Runs the task no earlier than `delay` from now.
    pub fn countdown(mut self, delay: Duration) -> Self {
        let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
        self.eta = Utc::now().checked_add_signed(delay);
        self
    }

    /// Retries the task up to `count` times after a failure (Fibonacci back-off unless the task says
    /// otherwise).
    pub fn retries(mut self, count: u32) -> Self {
        self.retry_count = count;
        self
    }

    /// Sets the retry delay that the back-off starts from (whole seconds on the wire, rounded up).
    pub fn retry_timeout(mut self, timeout: Duration) -> Self {
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        self.retry_timeout = u32::try_from(secs).unwrap_or(u32::MAX);
        self
    }

    /// Sets the AMQP priority (brokers without priorities ignore it).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers
            .get_or_insert_with(Headers::new)
            .insert(key.into(), value.into());
        self
    }

    /// Limits one run of the task to `limit`: a run that takes longer is cancelled and fails with a
    /// time-limit error. Overrides the task's `#[task(timeout = ..)]`. Travels in a header, which Go
    /// workers ignore.
    pub fn timeout(self, limit: Duration) -> Self {
        let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        self.header(TIME_LIMIT_HEADER, millis)
    }

    /// A task not started by `at` is never run: a worker that receives it later stores FAILURE with the
    /// error `expired: ...` (sending its error callbacks) instead of running it. Travels in a header,
    /// which Go workers ignore.
    pub fn expires_at(self, at: DateTime<Utc>) -> Self {
        self.header(
            EXPIRES_HEADER,
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
    }

    /// A task not started within `limit` from now is never run (see [`Signature::expires_at`]).
    pub fn expires_in(self, limit: Duration) -> Self {
        let limit = chrono::Duration::from_std(limit).unwrap_or(chrono::Duration::MAX);
        let at = Utc::now()
            .checked_add_signed(limit)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.expires_at(at)
    }

    /// When the task expires, if it does ([`Signature::expires_at`]); an unreadable header counts as
    /// none.
    pub fn expires(&self) -> Option<DateTime<Utc>> {
        let text = self.header_value(EXPIRES_HEADER)?.as_str()?;
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// Makes the task unique for `period`: sending the same task name with the same arguments while an
    /// earlier one is pending or running returns the earlier task's handle (same id) instead of queueing
    /// a second. The claim is released when the task reaches its final state, or after `period`,
    /// whichever comes first. Needs a result backend that can claim keys atomically (Redis, in-memory);
    /// elsewhere `send` fails saying so.
    pub fn unique_for(self, period: Duration) -> Self {
        let millis = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
        self.header(UNIQUE_FOR_HEADER, millis)
    }

    /// Marks the task immutable: its results are not appended to its `OnSuccess` callbacks' arguments.
    pub fn immutable(mut self) -> Self {
        self.immutable = true;
        self
    }

    /// Adds a callback sent after this task succeeds (with its results appended unless it is immutable).
    pub fn on_success<U>(mut self, callback: Signature<U>) -> Self {
        self.on_success.push(callback.erase());
        self
    }

    /// Adds a callback sent after this task finally fails, with the error text as its first argument.
    pub fn on_error<U>(mut self, callback: Signature<U>) -> Self {
        self.on_error.push(callback.erase());
        self
    }

    /// The task name quoted and escaped as `{:?}` writes it, cut to 100 characters (and its length told)
    /// when longer: for log lines and dead-letter reasons, which a 10 KB name would otherwise fill.
    pub fn quoted_name(&self) -> String {
        const MAX: usize = 100;
        match self.name.char_indices().nth(MAX) {
            None => format!("{:?}", self.name),
            Some((end, _)) => {
                let cut = format!("{}…", &self.name[..end]);
                format!("{cut:?} (a name of {} bytes)", self.name.len())
            }
        }
    }

    /// A header's value, if it is present.
    pub fn header_value(&self, key: &str) -> Option<&Value> {
        self.headers.as_ref().and_then(|h| h.get(key))
    }

    /// Encodes the message as Go machinery's JSON.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        // Every key is written even when empty, so a message is rarely under 400 bytes: start there
        // instead of growing from nothing.
        let mut json = Vec::with_capacity(512);
        self.write_json(&mut json)?;
        Ok(json)
    }

    pub(crate) fn set_encode_error(&mut self, error: String) {
        self.encode_error.get_or_insert(error);
    }
}

/// A new task id, `task_<uuid4>`.
pub fn new_task_uuid() -> String {
    prefixed_uuid("task_")
}

/// A new group id, `group_<uuid4>`.
pub fn new_group_uuid() -> String {
    prefixed_uuid("group_")
}

/// A new chord callback id, `chord_<uuid4>`.
pub fn new_chord_uuid() -> String {
    prefixed_uuid("chord_")
}

/// `prefix` and a new random UUID, hyphenated in lower case (what `format!` with its `Display` writes, in
/// one allocation and without the formatting machinery: every send makes one).
fn prefixed_uuid(prefix: &str) -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    let mut id = String::with_capacity(prefix.len() + text.len());
    id.push_str(prefix);
    id.push_str(text);
    id
}

/// Stack room that the recursive operations on a signature (reading, writing, cloning, comparing,
/// formatting a chain nested thousands deep) keep free, and the size of each stack segment they add on
/// the heap when they reach it.
const RED_ZONE: usize = 64 * 1024;
const STACK_SEGMENT: usize = 1024 * 1024;

/// Runs `f`, first moving to a fresh stack segment if the current one is nearly full.
fn deep<R>(f: impl FnOnce() -> R) -> R {
    stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, f)
}

impl<T> Drop for Signature<T> {
    /// Takes nested callbacks apart one level at a time: the glue Rust would generate recurses once per
    /// chain step, and a chain of thousands of steps would overflow the stack.
    fn drop(&mut self) {
        if self.on_success.is_empty() && self.on_error.is_empty() && self.chord_callback.is_none() {
            return;
        }
        let mut nested: Vec<Signature> = std::mem::take(&mut self.on_success);
        nested.append(&mut self.on_error);
        nested.extend(self.chord_callback.take().map(|callback| *callback));
        while let Some(mut signature) = nested.pop() {
            nested.append(&mut signature.on_success);
            nested.append(&mut signature.on_error);
            nested.extend(signature.chord_callback.take().map(|callback| *callback));
        }
    }
}

impl<T> Clone for Signature<T> {
    fn clone(&self) -> Self {
        deep(|| Signature {
            uuid: self.uuid.clone(),
            name: self.name.clone(),
            routing_key: self.routing_key.clone(),
            eta: self.eta,
            group_uuid: self.group_uuid.clone(),
            group_task_count: self.group_task_count,
            args: self.args.clone(),
            headers: self.headers.clone(),
            priority: self.priority,
            immutable: self.immutable,
            retry_count: self.retry_count,
            retry_timeout: self.retry_timeout,
            on_success: self.on_success.clone(),
            on_error: self.on_error.clone(),
            chord_callback: self.chord_callback.clone(),
            broker_message_group_id: self.broker_message_group_id.clone(),
            sqs_receipt_handle: self.sqs_receipt_handle.clone(),
            stop_task_deletion_on_error: self.stop_task_deletion_on_error,
            ignore_when_task_not_registered: self.ignore_when_task_not_registered,
            encode_error: self.encode_error.clone(),
            _output: PhantomData,
        })
    }
}

impl<T> PartialEq for Signature<T> {
    fn eq(&self, other: &Self) -> bool {
        deep(|| self.eq_fields(other))
    }
}

impl<T> Signature<T> {
    fn eq_fields(&self, other: &Self) -> bool {
        self.uuid == other.uuid
            && self.name == other.name
            && self.routing_key == other.routing_key
            && self.eta == other.eta
            && self.group_uuid == other.group_uuid
            && self.group_task_count == other.group_task_count
            && self.args == other.args
            && self.headers == other.headers
            && self.priority == other.priority
            && self.immutable == other.immutable
            && self.retry_count == other.retry_count
            && self.retry_timeout == other.retry_timeout
            && self.on_success == other.on_success
            && self.on_error == other.on_error
            && self.chord_callback == other.chord_callback
            && self.broker_message_group_id == other.broker_message_group_id
            && self.sqs_receipt_handle == other.sqs_receipt_handle
            && self.stop_task_deletion_on_error == other.stop_task_deletion_on_error
            && self.ignore_when_task_not_registered == other.ignore_when_task_not_registered
    }
}

impl<T> fmt::Debug for Signature<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        deep(|| self.fmt_fields(f))
    }
}

impl<T> Signature<T> {
    fn fmt_fields(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Signature");
        s.field("uuid", &self.uuid).field("name", &self.name);
        if !self.routing_key.is_empty() {
            s.field("routing_key", &self.routing_key);
        }
        if let Some(eta) = &self.eta {
            s.field("eta", eta);
        }
        if !self.group_uuid.is_empty() {
            s.field("group_uuid", &self.group_uuid)
                .field("group_task_count", &self.group_task_count);
        }
        s.field("args", &self.args);
        if self.retry_count > 0 {
            s.field("retry_count", &self.retry_count)
                .field("retry_timeout", &self.retry_timeout);
        }
        if !self.on_success.is_empty() {
            s.field("on_success", &self.on_success);
        }
        if !self.on_error.is_empty() {
            s.field("on_error", &self.on_error);
        }
        if let Some(cb) = &self.chord_callback {
            s.field("chord_callback", cb);
        }
        s.finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
