//! [`Server::cancel`]: stop a task whether it waits in a queue or runs in some worker process.

use crate::backend::BackendError;
use crate::broker::BrokerError;
use crate::wire::state::{State, TaskState};
use crate::Server;

/// Why a cancellation could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CancelError {
    /// The result backend could not be read or written.
    #[error("cancelling task {uuid}: {source}")]
    Backend {
        /// The task id.
        uuid: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The broker could not tell the workers.
    #[error("cancelling task {uuid}: {source}")]
    Broker {
        /// The task id.
        uuid: String,
        /// The broker's error.
        #[source]
        source: BrokerError,
    },
}

impl Server {
    /// Cancels a task, wherever it is.
    ///
    /// - Not started yet (pending, or waiting to be retried): its state becomes FAILURE with the error
    ///   [`CANCELLED_ERROR`](crate::state::CANCELLED_ERROR), and a worker that receives it later
    ///   acknowledges it without running it (as for [`Server::revoke`]).
    /// - Running, in whichever worker process: the broker tells every worker (Redis pub/sub, a RabbitMQ
    ///   fanout exchange, the memory broker's own workers); the one running it resolves the task's
    ///   [`TaskContext::cancelled`](crate::TaskContext::cancelled) at once, and drops the task's future
    ///   if it has not returned within the worker's [grace](crate::Worker::cancel_grace) (10 s by default).
    ///   Its final state is FAILURE with an error starting `cancelled: `, whatever it returned, and its
    ///   error callbacks are sent.
    /// - Finished: nothing changes.
    ///
    /// A worker whose connection to the broker is down when the request is published does not hear it.
    pub async fn cancel(&self, task_uuid: &str) -> Result<(), CancelError> {
        let backend_error = |source| CancelError::Backend {
            uuid: task_uuid.to_owned(),
            source,
        };
        let previous = self
            .backend()
            .get_state(task_uuid)
            .await
            .map_err(backend_error)?;
        if previous.as_ref().is_some_and(TaskState::is_completed) {
            return Ok(());
        }
        let running = previous
            .as_ref()
            .is_some_and(|s| matches!(s.state, State::Received | State::Started));
        if !running {
            let mut mark = TaskState::cancelled(task_uuid);
            if let Some(previous) = &previous {
                mark.merge_from_previous(previous);
            }
            self.backend()
                .set_state(&mark)
                .await
                .map_err(backend_error)?;
        }
        // Told even when it seemed not to run: a worker may have started it since we looked.
        match self.broker().publish_cancel(task_uuid).await {
            Ok(()) => Ok(()),
            // The mark alone stops a task that has not started.
            Err(BrokerError::Unsupported { .. }) if !running => Ok(()),
            Err(source) => Err(CancelError::Broker {
                uuid: task_uuid.to_owned(),
                source,
            }),
        }
    }
}
