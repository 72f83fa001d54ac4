//! The in-process broker by mistake: `Config::from_env` with `BROKER` unset still gives `memory://` (the
//! README's first command relies on it), but the server and the worker say at WARN that no other process
//! can reach its queues. A `memory://` broker chosen on purpose is quiet.

use std::io::Write;
use std::sync::{Arc, Mutex};

use machinery::{task, Config, Server, TaskError, Worker};

#[task]
async fn ipb_noop() -> Result<(), TaskError> {
    Ok(())
}

/// Everything logged at WARN or above, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts a server and a worker on `config` on a runtime of this thread, with a subscriber that captures
/// warnings; returns what it captured.
fn warnings_starting(config: Config) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = Server::new(config).await.unwrap();
        let running = Worker::new(&server)
            .register(ipb_noop::task())
            .start()
            .await
            .unwrap();
        running
            .shutdown(std::time::Duration::from_secs(5))
            .await
            .unwrap();
    });
    captured.text()
}

const WARNING: &str = "BROKER is not set, so the broker is the in-process memory:// one";

#[test]
fn broker_unset_in_the_environment_warns_from_server_and_worker() {
    let config = Config::from_lookup(|_| None).unwrap();
    assert_eq!(config.broker, "memory://", "the default stays");
    assert!(config.broker_is_in_process_by_default());
    let logged = warnings_starting(config);
    assert_eq!(
        logged.matches(WARNING).count(),
        2,
        "one warning from the server, one from the worker: {logged}"
    );
    assert!(logged.contains("WARN"), "{logged}");
    assert!(logged.contains("other processes"), "{logged}");
}

#[test]
fn a_memory_broker_chosen_on_purpose_is_quiet() {
    let named =
        Config::from_lookup(|var| (var == "BROKER").then(|| "memory://".to_owned())).unwrap();
    assert!(!named.broker_is_in_process_by_default());
    let logged = warnings_starting(named);
    assert!(!logged.contains(WARNING), "{logged}");
    let in_code = Config::default();
    assert!(!in_code.broker_is_in_process_by_default());
    assert!(!warnings_starting(in_code).contains(WARNING));
    // Read from the environment, then pointed elsewhere in code: not in-process, no warning.
    let mut moved = Config::from_lookup(|_| None).unwrap();
    moved.broker = "redis://127.0.0.1:1".into();
    assert!(!moved.broker_is_in_process_by_default());
}
