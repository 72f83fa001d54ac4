//! Trace context crosses the broker: a chain of 3 over Redis yields one trace, in which each task's span
//! is the child of the `send` span that published it, and each `send` span of a chain step is the child of
//! the task before it. Spans are collected with OpenTelemetry's in-memory exporter.

use std::time::Duration;

use machinery::{task, Chain, Config, Server, Signature, TaskError, Worker};
use machinery_tests::{require, unique, Service};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[task]
async fn traced_add(a: i64, b: i64) -> Result<i64, TaskError> {
    Ok(a + b)
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn task_span<'a>(spans: &'a [SpanData], uuid: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == "task" && attribute(s, "task.uuid").is_some_and(|v| v.as_str() == uuid))
        .unwrap_or_else(|| panic!("no task span for {uuid}"))
}

fn span_by_id(spans: &[SpanData], id: SpanId) -> &SpanData {
    spans
        .iter()
        .find(|s| s.span_context.span_id() == id)
        .unwrap_or_else(|| panic!("no span with id {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_over_redis_is_one_trace_with_the_right_parents() {
    if !require(
        Service::Redis,
        "a_chain_of_three_over_redis_is_one_trace_with_the_right_parents",
    ) {
        return;
    }
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("machinery-tests")));
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber of this test binary");

    let queue = unique("trace");
    let url = Service::Redis.url();
    let mut config = Config::new(&url, &url).with_default_queue(&queue);
    config.results_expire_in = 60;
    let server = Server::new(config).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();

    let root = tracing::info_span!("client_request");
    let chain = Chain::new(traced_add::signature(1, 1))
        .then(traced_add::partial(2))
        .then(traced_add::partial(3));
    // A header from another tracer (Go's Jaeger) travels untouched.
    let chain_result = async {
        let chain = chain;
        server.send_chain(chain).await.unwrap()
    }
    .instrument(root.clone())
    .await;
    assert_eq!(chain_result.get(Duration::from_secs(10)).await.unwrap(), 7);
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    drop(root);
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();

    let uuids: Vec<String> = chain_result
        .steps()
        .iter()
        .map(|s| s.uuid().to_owned())
        .chain([chain_result.last().uuid().to_owned()])
        .collect();
    let root_span = spans
        .iter()
        .find(|s| s.name == "client_request")
        .expect("root span");
    let trace: TraceId = root_span.span_context.trace_id();
    let mut parent_of_send = root_span.span_context.span_id();
    for uuid in &uuids {
        let task = task_span(&spans, uuid);
        assert_eq!(
            task.span_context.trace_id(),
            trace,
            "task {uuid} is in another trace"
        );
        let send = span_by_id(&spans, task.parent_span_id);
        assert_eq!(send.name, "send", "task {uuid}'s parent is not a send span");
        assert_eq!(
            send.parent_span_id, parent_of_send,
            "send span of {uuid} has the wrong parent"
        );
        assert_eq!(
            attribute(task, "outcome").map(|v| v.as_str().into_owned()),
            Some("SUCCESS".into())
        );
        parent_of_send = task.span_context.span_id();
    }
}

static SEEN: std::sync::Mutex<Vec<Option<String>>> = std::sync::Mutex::new(Vec::new());

#[task(backoff = machinery::retry::Fixed(Duration::from_millis(20)))]
async fn remember_jaeger_header(ctx: &machinery::TaskContext) -> Result<(), TaskError> {
    let header = ctx
        .headers()
        .get("uber-trace-id")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let mut seen = SEEN.lock().unwrap();
    seen.push(header);
    if seen.len() == 1 {
        return Err(TaskError::new("fail once, to be re-published"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_we_do_not_understand_survive_a_re_publish() {
    if !require(
        Service::Redis,
        "headers_we_do_not_understand_survive_a_re_publish",
    ) {
        return;
    }
    let queue = unique("trace_hdr");
    let url = Service::Redis.url();
    let mut config = Config::new(&url, &url).with_default_queue(&queue);
    config.redis.delayed_tasks_key = format!("{queue}_delayed");
    config.redis.delayed_tasks_poll_period = 20;
    config.results_expire_in = 60;
    let server = Server::new(config).await.unwrap();
    let worker = Worker::auto(&server).start().await.unwrap();
    let sig: Signature<()> = remember_jaeger_header::signature()
        .retries(1)
        .header("uber-trace-id", "abc:def:0:1");
    server
        .send(sig)
        .await
        .unwrap()
        .get(Duration::from_secs(10))
        .await
        .unwrap();
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![Some("abc:def:0:1".to_owned()); 2],
        "the retry lost Go's tracing header"
    );
}
