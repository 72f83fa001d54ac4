//! `Worker::auto` refuses two different tasks registered under one wire name, naming both.

use machinery::{task, Config, Server, TaskError, Worker, WorkerError};

mod billing {
    use super::*;

    #[task(name = "process")]
    pub async fn charge(amount: i64) -> Result<i64, TaskError> {
        Ok(amount)
    }
}

mod shipping {
    use super::*;

    #[task(name = "process")]
    pub async fn ship(parcel: String) -> Result<String, TaskError> {
        Ok(parcel)
    }
}

#[tokio::test]
async fn auto_with_two_tasks_of_one_name_fails_at_start_naming_both() {
    let server = Server::new(Config::default()).await.unwrap();
    let err = Worker::auto(&server).start().await.unwrap_err();
    match &err {
        WorkerError::DuplicateTask {
            name,
            first,
            second,
        } => {
            assert_eq!(name, "process");
            assert_eq!(first, "worker_duplicate_names::billing::charge");
            assert_eq!(second, "worker_duplicate_names::shipping::ship");
        }
        other => panic!("expected DuplicateTask, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("billing::charge") && message.contains("shipping::ship"),
        "{message}"
    );
    // Registering just one of them is fine.
    let running = Worker::new(&server)
        .register(billing::charge::task())
        .start()
        .await
        .unwrap();
    running
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .unwrap();
}
