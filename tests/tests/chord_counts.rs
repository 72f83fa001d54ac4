//! Chord members whose `GroupTaskCount` cannot be right (issue 18, case 7), pushed raw onto a Redis queue
//! next to a running worker: a count of 0, a negative count, and a count below the members the group
//! record lists. Go fires in none of these cases; we dead-letter each member with the reason before it
//! runs, the callback never fires, and a proper chord sent afterwards completes with every result.

mod redis_common;

use std::time::Duration;

use machinery::{Chord, Group, GroupMeta, Server, Signature, State, Worker};
use machinery_tests::tasks::{collect, probe};
use machinery_tests::{eventually, require, Service};
use redis::AsyncCommands as _;
use redis_common::{raw, Names};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chord_members_with_an_impossible_count_are_dead_lettered_and_never_fire() {
    if !require(Service::Redis, "chord counts") {
        return;
    }
    let names = Names::new("chord_counts");
    let server = Server::new(names.config()).await.unwrap();
    let running = Worker::new(&server)
        .register(probe::task())
        .register(collect::task())
        .concurrency(4)
        .start()
        .await
        .unwrap();
    let mut conn = raw().await;
    let key = names.id.clone();

    // Three chords of three listed members each; one member of each is sent, with a bad count.
    let mut callbacks = Vec::new();
    for (case, count) in [("zero", "0"), ("negative", "-3"), ("below", "1")] {
        let group = format!("group_{}_{case}", names.id);
        let members: Vec<String> = (0..3).map(|n| names.task(format!("{case}_{n}"))).collect();
        server
            .backend()
            .init_group(&GroupMeta::new(group.clone(), members.clone()))
            .await
            .unwrap();
        let mut callback = collect::signature(key.clone(), vec![]).erase();
        callback.uuid = names.task(format!("{case}_callback"));
        callbacks.push(callback.uuid.clone());
        let mut member = probe::signature(&key, 1, 0).erase();
        member.uuid = members[0].clone();
        member.group_uuid = group;
        member.group_task_count = 3; // replaced in the text below, as a hand-written message would be
        member.chord_callback = Some(Box::new(callback));
        let body = String::from_utf8(member.to_json().unwrap())
            .unwrap()
            .replace(
                "\"GroupTaskCount\":3",
                &format!("\"GroupTaskCount\":{count}"),
            );
        assert!(body.contains(&format!("\"GroupTaskCount\":{count}")));
        let _: () = conn.rpush(&names.queue, body).await.unwrap();
    }

    let inspect = server.broker().inspect().unwrap();
    let all_dead = eventually(WAIT, || async {
        inspect.dead_letters(&names.queue, 10).await.unwrap().len() == 3
    })
    .await;
    let dead = inspect.dead_letters(&names.queue, 10).await.unwrap();
    assert!(all_dead, "three dead letters within {WAIT:?}: {dead:?}");
    for letter in &dead {
        assert!(
            letter.reason.contains("GroupTaskCount"),
            "{}",
            letter.reason
        );
        let uuid = Signature::from_json(&letter.body).unwrap().uuid.clone();
        // The sender learns why at once.
        let state = server.result::<i64>(uuid).state().await.unwrap().unwrap();
        assert_eq!(state.state, State::Failure);
        assert!(state.error.contains("GroupTaskCount"), "{}", state.error);
    }
    for callback in &callbacks {
        let state = server
            .result::<i64>(callback.clone())
            .state()
            .await
            .unwrap();
        assert!(
            state.is_none(),
            "callback {callback} never fired: {state:?}"
        );
    }

    // A proper chord still completes with every member's result.
    let chord = Chord::new(
        Group::new([
            probe::signature(&key, 10, 0),
            probe::signature(&key, 20, 0),
            probe::signature(&key, 30, 0),
        ]),
        collect::partial(key.clone()),
    );
    let result = server.send_chord(chord).await.unwrap();
    assert_eq!(result.get(WAIT).await.unwrap(), 60);
    running.shutdown(Duration::from_secs(5)).await.unwrap();
    names.cleanup().await;
}
