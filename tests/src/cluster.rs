//! Administration of the local Redis Cluster `scripts/services.sh up` starts (3 masters, 3 replicas on
//! 127.0.0.1:7000-7005, each node's directory and pid file under `target/services/cluster/<port>`): which
//! node serves a key, manual failover, SIGKILL of a node and its restart (it rejoins as a replica), and
//! waiting until every node reports `cluster_state:ok`.

use std::path::PathBuf;
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// The ports of the local cluster's nodes.
pub const PORTS: [u16; 6] = [7000, 7001, 7002, 7003, 7004, 7005];

/// A plain connection to one node.
pub async fn node(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// `CLUSTER KEYSLOT <key>`, asked of the server.
pub async fn keyslot(key: &str) -> u16 {
    for port in PORTS {
        if let Ok(mut conn) = node(port).await {
            if let Ok(slot) = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut conn)
                .await
            {
                return slot;
            }
        }
    }
    panic!("no cluster node answers CLUSTER KEYSLOT");
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    /// The node id.
    pub id: String,
    /// The node's client port.
    pub port: u16,
    /// Whether it is a master (and not failed).
    pub master: bool,
    /// Its master's id, for a replica.
    pub master_id: Option<String>,
    /// Whether the others count it as failing.
    pub failed: bool,
    /// The slot ranges it serves, for a master.
    pub slots: Vec<(u16, u16)>,
}

/// `CLUSTER NODES` as one live node sees it.
pub async fn nodes() -> Vec<NodeLine> {
    for port in PORTS {
        let Ok(mut conn) = node(port).await else {
            continue;
        };
        let Ok(text) = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
        else {
            continue;
        };
        return text.lines().filter_map(parse_line).collect();
    }
    panic!("no cluster node answers CLUSTER NODES");
}

fn parse_line(line: &str) -> Option<NodeLine> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()?;
    let flags = fields.get(2)?;
    let slots = fields
        .iter()
        .skip(8)
        .filter(|range| !range.starts_with('['))
        .filter_map(|range| match range.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => range.parse().ok().map(|s| (s, s)),
        })
        .collect();
    Some(NodeLine {
        id: fields[0].to_owned(),
        port,
        master: flags.contains("master") && !flags.contains("fail"),
        master_id: (fields.get(3)? != &"-").then(|| fields[3].to_owned()),
        failed: flags.contains("fail"),
        slots,
    })
}

/// The port of the master serving `key`'s slot.
pub async fn master_of(key: &str) -> u16 {
    let slot = keyslot(key).await;
    nodes()
        .await
        .into_iter()
        .find(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
        .map(|n| n.port)
        .expect("a master serves the slot")
}

/// The port of a live replica of the master on `master_port`.
pub async fn replica_of(master_port: u16) -> u16 {
    let all = nodes().await;
    let master = all
        .iter()
        .find(|n| n.port == master_port)
        .expect("the master is known");
    all.iter()
        .find(|n| !n.failed && n.master_id.as_deref() == Some(master.id.as_str()))
        .map(|n| n.port)
        .expect("the master has a live replica")
}

/// `ROLE` of one node: "master" or "slave".
pub async fn role(port: u16) -> Option<String> {
    let mut conn = node(port).await.ok()?;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.ok()?;
    redis::from_redis_value(role.into_iter().next()?).ok()
}

/// Whether every node answers and reports `cluster_state:ok` and the whole cluster has three masters.
pub async fn healthy() -> bool {
    for port in PORTS {
        let Ok(mut conn) = node(port).await else {
            return false;
        };
        let Ok(info) = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut conn)
            .await
        else {
            return false;
        };
        if !info.contains("cluster_state:ok") {
            return false;
        }
    }
    let all = nodes().await;
    all.iter().filter(|n| n.master).count() == 3 && all.iter().all(|n| !n.failed)
}

/// Waits until [`healthy`], up to `limit`.
pub async fn wait_healthy(limit: Duration) -> bool {
    crate::eventually(limit, healthy).await
}

fn node_dir(port: u16) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/services/cluster")
        .join(port.to_string())
}

/// The pid of the node on `port`, from its pid file.
pub fn pid(port: u16) -> Option<i32> {
    std::fs::read_to_string(node_dir(port).join("redis.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// SIGKILL to the node on `port`.
pub fn kill(port: u16) {
    let pid = pid(port).expect("the node's pid file");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -KILL {pid}");
}

/// Starts the node on `port` again as `scripts/services.sh` did, from its directory (its `nodes.conf`
/// makes it rejoin the cluster; a master that was replaced comes back as a replica of its successor).
pub fn restart(port: u16) {
    let dir = node_dir(port);
    let dir = dir.to_string_lossy();
    let status = std::process::Command::new("redis-server")
        .args(["--daemonize", "yes", "--bind", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--dir", &dir])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args([
            "--cluster-node-timeout",
            "2000",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--logfile", &format!("{dir}/redis.log")])
        .args(["--pidfile", &format!("{dir}/redis.pid")])
        .status()
        .expect("redis-server runs");
    assert!(status.success(), "redis-server on :{port} started");
}

/// `CLUSTER FAILOVER` on the replica on `port`: it takes over from its master, coordinated (no write
/// acknowledged by the master is lost).
pub async fn failover(port: u16) {
    let mut conn = node(port).await.expect("the replica answers");
    let () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER FAILOVER");
}

/// Every key on every master that contains `needle` (with `SCAN`).
pub async fn keys_containing(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for n in nodes().await.into_iter().filter(|n| n.master) {
        let Ok(mut conn) = node(n.port).await else {
            continue;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{}*", glob_escape(needle)))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
            else {
                break;
            };
            found.extend(keys);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    found
}

fn glob_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
            c => vec![c],
        })
        .collect()
}
