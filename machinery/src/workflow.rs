//! Typed workflows: [`Group`], [`Chord`] and [`Chain`], checked by the compiler, sent in Go machinery's
//! wire form (reference §6).
//!
//! ```
//! # async fn demo() -> Result<(), machinery::Error> {
//! use std::time::Duration;
//! use machinery::{task, Chain, Chord, Config, Group, Server, TaskError, Worker};
//!
//! #[task]
//! async fn add(a: i64, b: i64) -> Result<i64, TaskError> { Ok(a + b) }
//! #[task]
//! async fn multiply(a: i64, b: i64) -> Result<i64, TaskError> { Ok(a * b) }
//! #[task]
//! async fn sum(xs: Vec<i64>) -> Result<i64, TaskError> { Ok(xs.iter().sum()) }
//!
//! let server = Server::new(Config::default()).await?;
//! let worker = Worker::auto(&server).start().await?;
//! let t = Duration::from_secs(5);
//!
//! let group = Group::new([add::signature(1, 1), add::signature(2, 2)]);
//! assert_eq!(server.send_group(group).await?.get(t).await?, vec![2, 4]);
//!
//! let chord = Chord::new(Group::new([add::signature(1, 1), add::signature(2, 2)]), sum::partial());
//! assert_eq!(server.send_chord(chord).await?.get(t).await?, 6);
//!
//! let chain = Chain::new(add::signature(1, 1)).then(add::partial(5)).then(multiply::partial(4));
//! assert_eq!(server.send_chain(chain).await?.get(t).await?, 28);
//! worker.shutdown(t).await?;
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::mem::take;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use crate::error::SendError;
use crate::result::{AsyncResult, ResultError};
use crate::wire::signature::{new_chord_uuid, new_group_uuid, new_task_uuid, Signature};
use crate::wire::state::{GroupMeta, TaskState};
use crate::Server;

/// A task's signature with its last parameter left open: a chain fills it with the previous step's
/// output, a chord with the group's results. `In` is the type of that parameter, `Out` what the task
/// returns. `#[task]` generates `my_task::partial(..)`, taking every parameter but the last.
pub struct Partial<In, Out> {
    signature: Signature<Out>,
    _input: PhantomData<fn(In)>,
}

impl<In, Out> Partial<In, Out> {
    /// Wraps a signature whose last argument is missing (used by `#[task]`'s `partial`).
    pub fn new(signature: Signature<Out>) -> Self {
        Partial {
            signature,
            _input: PhantomData,
        }
    }

    /// Changes the underlying signature's options: `add::partial(5).configure(|s| s.retries(3))`.
    pub fn configure(self, f: impl FnOnce(Signature<Out>) -> Signature<Out>) -> Self {
        Partial::new(f(self.signature))
    }

    /// The signature, without the open argument.
    pub fn signature(&self) -> &Signature<Out> {
        &self.signature
    }
}

impl<In, Out> fmt::Debug for Partial<In, Out> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Partial").field(&self.signature).finish()
    }
}

impl<In, Out> Clone for Partial<In, Out> {
    fn clone(&self) -> Self {
        Partial::new(self.signature.clone())
    }
}

/// Tasks that run in parallel; their results come back in group order as a `Vec<T>`.
pub struct Group<T> {
    members: Vec<Signature<T>>,
}

impl<T> Group<T> {
    /// A group of these tasks.
    pub fn new(members: impl IntoIterator<Item = Signature<T>>) -> Self {
        Group {
            members: members.into_iter().collect(),
        }
    }

    /// The number of tasks.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the group has no task.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl<T> Group<T> {
    /// Adds a header to every member.
    pub fn with_header(mut self, key: &str, value: impl Into<Value> + Clone) -> Self {
        self.members = with_header(self.members, key, value);
        self
    }
}

/// `members`, each with the header `key` set to `value`.
fn with_header<T>(
    members: Vec<Signature<T>>,
    key: &str,
    value: impl Into<Value> + Clone,
) -> Vec<Signature<T>> {
    members
        .into_iter()
        .map(|m| m.header(key, value.clone()))
        .collect()
}

impl<T> Clone for Group<T> {
    fn clone(&self) -> Self {
        Group {
            members: self.members.clone(),
        }
    }
}

impl<T> fmt::Debug for Group<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Group").field(&self.members).finish()
    }
}

/// A group whose results, in group order, are the last argument of a callback task.
pub struct Chord<O> {
    members: Vec<Signature>,
    callback: Signature<O>,
}

impl<O> Chord<O> {
    /// The group and its callback; the callback's last parameter must be `Vec<T>` of the members' output.
    pub fn new<T>(group: Group<T>, callback: Partial<Vec<T>, O>) -> Self {
        Chord {
            members: group.members.into_iter().map(Signature::erase).collect(),
            callback: callback.signature,
        }
    }

    /// A task to run if a member fails (the callback then never runs); it gets the failure text as its
    /// first argument, like Go's `OnError` callbacks.
    pub fn on_error<U>(mut self, callback: Signature<U>) -> Self {
        self.callback = self.callback.on_error(callback);
        self
    }
}

impl<O> Chord<O> {
    /// Adds a header to every member of the group.
    pub fn with_header(mut self, key: &str, value: impl Into<Value> + Clone) -> Self {
        self.members = with_header(self.members, key, value);
        self
    }
}

impl<O> Clone for Chord<O> {
    fn clone(&self) -> Self {
        Chord {
            members: self.members.clone(),
            callback: self.callback.clone(),
        }
    }
}

impl<O> fmt::Debug for Chord<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chord")
            .field("members", &self.members)
            .field("callback", &self.callback)
            .finish()
    }
}

/// Tasks run one after the other, each step's output appended to the next step's arguments (Go nests the
/// steps in `OnSuccess`).
pub struct Chain<T> {
    steps: Vec<Signature>,
    _output: PhantomData<fn() -> T>,
}

/// Something that can follow a step whose output is `In` in a [`Chain`].
#[diagnostic::on_unimplemented(
    message = "this chain step cannot take the previous step's output, a `{In}`",
    label = "the last parameter of this step's task must be `{In}` (or `Vec<{In}>`)",
    note = "build the step with `my_task::partial(..)` from a task whose last parameter is `{In}`, or pass a complete `my_task::signature(..)`, which takes no previous output"
)]
pub trait ChainStep<In> {
    /// What the step returns.
    type Output;
    /// The step's signature, and whether it takes the previous output as its last argument.
    fn into_step(self) -> (Signature, bool);
}

impl<In, O> ChainStep<In> for Partial<In, O> {
    type Output = O;
    fn into_step(self) -> (Signature, bool) {
        (self.signature.erase(), true)
    }
}

/// A task whose last parameter is `Vec<T>` also follows a step returning one `T`: the output is appended as
/// one more element (Go's variadic form, which is how Go chains feed variadic tasks).
impl<T, O> ChainStep<T> for Partial<Vec<T>, O> {
    type Output = O;
    fn into_step(self) -> (Signature, bool) {
        (self.signature.erase(), true)
    }
}

/// A complete signature takes no previous result (the previous step is marked immutable on the wire, so
/// Go workers do not append it either).
impl<In, O> ChainStep<In> for Signature<O> {
    type Output = O;
    fn into_step(self) -> (Signature, bool) {
        (self.erase(), false)
    }
}

impl<T> Chain<T> {
    /// A chain starting with this task.
    pub fn new(first: Signature<T>) -> Self {
        Chain {
            steps: vec![first.erase()],
            _output: PhantomData,
        }
    }

    /// Appends a step: `add::partial(5)` gets this chain's output as its last argument; a complete
    /// signature gets nothing from it.
    pub fn then<S: ChainStep<T>>(mut self, step: S) -> Chain<S::Output> {
        let (signature, takes_previous) = step.into_step();
        if let Some(previous) = self.steps.last_mut() {
            previous.immutable = !takes_previous;
        }
        self.steps.push(signature);
        Chain {
            steps: self.steps,
            _output: PhantomData,
        }
    }

    /// The number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a chain has a first step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

impl<T> Chain<T> {
    /// Adds a header to the first step (the message that is sent).
    pub fn with_header(mut self, key: &str, value: impl Into<Value>) -> Self {
        if let Some(first) = self.steps.first_mut() {
            let headers = first.headers.get_or_insert_with(Default::default);
            headers.insert(key.to_owned(), value.into());
        }
        self
    }
}

impl<T> Clone for Chain<T> {
    fn clone(&self) -> Self {
        Chain {
            steps: self.steps.clone(),
            _output: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Chain<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Chain").field(&self.steps).finish()
    }
}

/// The results of a sent [`Group`].
pub struct GroupResult<T> {
    group_uuid: String,
    members: Vec<AsyncResult<T>>,
}

impl<T> fmt::Debug for GroupResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupResult")
            .field("group_uuid", &self.group_uuid)
            .field("members", &self.members)
            .finish()
    }
}

impl<T> GroupResult<T> {
    /// The group id.
    pub fn group_uuid(&self) -> &str {
        &self.group_uuid
    }

    /// One handle per member, in group order.
    pub fn members(&self) -> &[AsyncResult<T>] {
        &self.members
    }
}

impl<T: DeserializeOwned> GroupResult<T> {
    /// Waits up to `timeout` (for all members together) and returns their outputs in group order; the
    /// first failed member (in group order) is the error, naming the member.
    pub async fn get(&self, timeout: Duration) -> Result<Vec<T>, ResultError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut outputs = Vec::with_capacity(self.members.len());
        for (index, member) in self.members.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match member.get(left).await {
                Ok(output) => outputs.push(output),
                Err(source) => {
                    return Err(ResultError::GroupMember {
                        group_uuid: self.group_uuid.clone(),
                        index,
                        source: Box::new(source),
                    })
                }
            }
        }
        Ok(outputs)
    }
}

/// The result of a sent [`Chord`]: the callback's output, or the failure that stopped it.
pub struct ChordResult<O> {
    group: GroupResult<Value>,
    callback: AsyncResult<O>,
}

impl<O> fmt::Debug for ChordResult<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChordResult")
            .field("group", &self.group)
            .field("callback", &self.callback)
            .finish()
    }
}

impl<O> ChordResult<O> {
    /// The group's member results (untyped).
    pub fn group(&self) -> &GroupResult<Value> {
        &self.group
    }

    /// The callback's result handle.
    pub fn callback(&self) -> &AsyncResult<O> {
        &self.callback
    }
}

impl<O: DeserializeOwned> ChordResult<O> {
    /// Waits for the callback's output. If a member fails, the worker that completes the group stores a
    /// FAILURE for the callback naming that member, so this returns that error instead of hanging.
    pub async fn get(&self, timeout: Duration) -> Result<O, ResultError> {
        self.callback.get(timeout).await
    }
}

/// The result of a sent [`Chain`].
pub struct ChainResult<T> {
    steps: Vec<AsyncResult<Value>>,
    last: AsyncResult<T>,
}

impl<T> fmt::Debug for ChainResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainResult")
            .field("steps", &self.steps)
            .field("last", &self.last)
            .finish()
    }
}

impl<T> ChainResult<T> {
    /// Handles to every step but the last, in order.
    pub fn steps(&self) -> &[AsyncResult<Value>] {
        &self.steps
    }

    /// The last step's handle.
    pub fn last(&self) -> &AsyncResult<T> {
        &self.last
    }
}

impl<T: DeserializeOwned> ChainResult<T> {
    /// Waits for the steps in order and returns the last one's output; a failed step stops the chain and is
    /// the error, naming the step.
    pub async fn get(&self, timeout: Duration) -> Result<T, ResultError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for (index, step) in self.steps.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let state = step
                .wait(left)
                .await
                .map_err(|source| ResultError::ChainStep {
                    index,
                    source: Box::new(source),
                })?;
            if let Err(source) = crate::result::decode_state::<Value>(&state, &state.task_name) {
                return Err(ResultError::ChainStep {
                    index,
                    source: Box::new(source),
                });
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.last
            .get(left)
            .await
            .map_err(|source| ResultError::ChainStep {
                index: self.steps.len(),
                source: Box::new(source),
            })
    }
}

impl Server {
    /// Sends a group: stores the group record and the members' PENDING states, then publishes the members.
    pub async fn send_group<T>(&self, group: Group<T>) -> Result<GroupResult<T>, SendError> {
        let mut members: Vec<Signature> = group.members.into_iter().map(Signature::erase).collect();
        let group_uuid = self.publish_group(&mut members).await?;
        Ok(GroupResult {
            group_uuid,
            members: members
                .into_iter()
                .map(|mut m| AsyncResult::new(self.clone(), take(&mut m.uuid), take(&mut m.name)))
                .collect(),
        })
    }

    /// Sends a chord: a group whose every member carries the callback; the worker that finishes the last
    /// member sends it, once.
    pub async fn send_chord<O>(&self, chord: Chord<O>) -> Result<ChordResult<O>, SendError> {
        let mut callback = chord.callback.erase();
        if callback.uuid.is_empty() {
            callback.uuid = new_chord_uuid();
        }
        let mut members = chord.members;
        for member in &mut members {
            member.chord_callback = Some(Box::new(callback.clone()));
        }
        let group_uuid = self.publish_group(&mut members).await?;
        Ok(ChordResult {
            group: GroupResult {
                group_uuid,
                members: members
                    .into_iter()
                    .map(|mut m| {
                        AsyncResult::new(self.clone(), take(&mut m.uuid), take(&mut m.name))
                    })
                    .collect(),
            },
            callback: AsyncResult::new(
                self.clone(),
                take(&mut callback.uuid),
                take(&mut callback.name),
            ),
        })
    }

    /// Sends a chain: the first step's message carries the rest nested in `OnSuccess`.
    pub async fn send_chain<T>(&self, chain: Chain<T>) -> Result<ChainResult<T>, SendError> {
        let mut steps = chain.steps;
        for step in &mut steps {
            if step.uuid.is_empty() {
                step.uuid = new_task_uuid();
            }
        }
        let mut handles: Vec<AsyncResult<Value>> = steps
            .iter()
            .map(|s| AsyncResult::new(self.clone(), s.uuid.clone(), s.name.clone()))
            .collect();
        let mut nested: Option<Signature> = None;
        while let Some(mut step) = steps.pop() {
            if let Some(next) = nested.take() {
                step.on_success.push(next);
            }
            nested = Some(step);
        }
        let Some(mut first) = nested else {
            return Err(SendError::Workflow(
                "a chain needs at least one step".into(),
            ));
        };
        self.publish(&mut first).await?;
        let last = handles
            .pop()
            .map(AsyncResult::retype)
            .ok_or_else(|| SendError::Workflow("empty chain".into()))?;
        Ok(ChainResult {
            steps: handles,
            last,
        })
    }

    async fn publish_group(&self, members: &mut [Signature]) -> Result<String, SendError> {
        let span = tracing::info_span!(
            "send",
            workflow = "group",
            group.uuid = tracing::field::Empty
        );
        self.publish_group_members(members).instrument(span).await
    }

    async fn publish_group_members(&self, members: &mut [Signature]) -> Result<String, SendError> {
        if members.is_empty() {
            return Err(SendError::Workflow(
                "a group needs at least one task".into(),
            ));
        }
        let group_uuid = new_group_uuid();
        tracing::Span::current().record("group.uuid", group_uuid.as_str());
        let count = u32::try_from(members.len())
            .map_err(|_| SendError::Workflow("group too large".into()))?;
        for member in members.iter_mut() {
            member.group_uuid.clone_from(&group_uuid);
            member.group_task_count = count;
            self.prepare(member)?;
        }
        let outgoing = members
            .iter()
            .map(|member| self.encode(member))
            .collect::<Result<Vec<_>, _>>()?;
        let uuids = members.iter().map(|m| m.uuid.clone()).collect();
        let backend = self.backend();
        let meta = GroupMeta::new(group_uuid.clone(), uuids);
        backend
            .init_group(&meta)
            .await
            .map_err(|source| SendError::Backend {
                task: "group".into(),
                source,
            })?;
        let pending: Vec<TaskState> = members
            .iter()
            .map(|m| TaskState::pending(&m.uuid, &m.name))
            .collect();
        backend
            .set_states(&pending)
            .await
            .map_err(|source| SendError::Backend {
                task: "group".into(),
                source,
            })?;
        self.broker()
            .publish_many(outgoing)
            .await
            .map_err(|source| SendError::Broker {
                task: "group".into(),
                source,
            })?;
        Ok(group_uuid)
    }
}
