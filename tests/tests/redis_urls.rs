//! The Redis URL forms against a private `redis-server` this test starts (TLS with a self-signed
//! certificate, a unix socket, a password): `rediss://…#insecure`, `redis+socket://pass@/path:/db`, and
//! errors that never show the password.
//!
//! Needs `redis-server` (built with TLS, as Debian's is) and `openssl` on the PATH; without them the test
//! is skipped, or fails under `CI=true`/`MACHINERY_REQUIRE_SERVICES=1`.

mod redis_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use machinery::{Config, Server, Signature, Worker};
use machinery_tests::services_required;
use redis_common::{int, ADD};

const PASSWORD: &str = "s3cret-pass";

/// A redis-server with a TLS port and a unix socket, stopped on drop.
struct PrivateRedis {
    child: Child,
    dir: PathBuf,
    tls_port: u16,
}

impl PrivateRedis {
    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn start(test: &str) -> Option<PrivateRedis> {
        let found = |tool: &str, arg: &str| {
            Command::new(tool)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found("redis-server", "--version") || !found("openssl", "version") {
            let message = format!("{test}: needs redis-server and openssl on the PATH");
            assert!(!services_required(), "{message}");
            eprintln!("SKIPPED {message}");
            return None;
        }
        let dir = std::env::temp_dir().join(machinery_tests::unique("machinery_redis_tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "openssl could not make a certificate");
        let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args([
                "--tls-port",
                &tls_port.to_string(),
                "--tls-auth-clients",
                "no",
            ])
            .arg("--tls-cert-file")
            .arg(dir.join("cert.pem"))
            .arg("--tls-key-file")
            .arg(dir.join("key.pem"))
            .arg("--unixsocket")
            .arg(dir.join("redis.sock"))
            .args(["--requirepass", PASSWORD])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = PrivateRedis {
            child,
            dir,
            tls_port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !server.socket().exists()
            || std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `add(20, 22)` through a worker on `url` (broker and backend) and returns the result.
async fn round_trip(url: &str, queue: &str) -> i64 {
    let config = Config::new(url, url).with_default_queue(queue);
    let server = Server::new(config).await.unwrap();
    let running = Worker::new(&server)
        .register(&ADD)
        .concurrency(1)
        .start()
        .await
        .unwrap();
    let sig: Signature = Signature::with_args("add", vec![int(20), int(22)]);
    let sum = server
        .send(sig.retype::<i64>())
        .await
        .unwrap()
        .get(Duration::from_secs(10))
        .await
        .unwrap();
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    sum
}

async fn keys_in_db(socket: &Path, db: i64) -> Vec<String> {
    let url = format!("redis+socket://{PASSWORD}@{}:/{db}", socket.display());
    let info = machinery::redis_url::RedisUrl::parse(&url).unwrap();
    assert_eq!(info.db, db);
    let client = redis::Client::open(redis::ConnectionAddr::Unix(socket.to_owned())).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("AUTH")
        .arg(PASSWORD)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(db)
        .query_async(&mut conn)
        .await
        .unwrap();
    redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_socket_and_password_urls_reach_the_right_database() {
    let Some(redis) = PrivateRedis::start("tls_socket_and_password_urls_reach_the_right_database")
    else {
        return;
    };
    // rediss:// with a lone userinfo (the password, as in Go), database 3, certificate not checked.
    let tls = format!(
        "rediss://{PASSWORD}@127.0.0.1:{}/3#insecure",
        redis.tls_port
    );
    assert_eq!(round_trip(&tls, "tls_q").await, 42);
    let keys = keys_in_db(&redis.socket(), 3).await;
    assert!(
        keys.iter().any(|k| k.starts_with("task_")),
        "the result is in database 3: {keys:?}"
    );

    // redis+socket://pass@/path:/db
    let socket = format!("redis+socket://{PASSWORD}@{}:/2", redis.socket().display());
    assert_eq!(round_trip(&socket, "socket_q").await, 42);
    let keys = keys_in_db(&redis.socket(), 2).await;
    assert!(
        keys.iter().any(|k| k.starts_with("task_")),
        "the result is in database 2: {keys:?}"
    );
}

#[tokio::test]
async fn connection_errors_never_show_the_password() {
    let Some(redis) = PrivateRedis::start("connection_errors_never_show_the_password") else {
        return;
    };
    let cases = [
        // A wrong password.
        format!(
            "redis+socket://wrong-{PASSWORD}@{}",
            redis.socket().display()
        ),
        // A certificate we do not trust (no #insecure).
        format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.tls_port),
        // Nobody listening.
        format!("redis://user:{PASSWORD}@127.0.0.1:1"),
    ];
    for url in cases {
        let error = Server::new(Config::new(&url, "memory://"))
            .await
            .unwrap_err()
            .to_string();
        assert!(!error.contains(PASSWORD), "{error}");
        assert!(error.contains("***"), "the URL is shown redacted: {error}");
    }
}
