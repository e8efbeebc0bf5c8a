//! The S3 test server survives a port it is given being taken: CI once
//! saw `weed mini` die because a port it was given was taken before it
//! bound it (weed then tries port + 1 itself, which the old allocator had
//! handed to its next listener).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration_tests::ports::loopback_port;
use integration_tests::seaweed::SeaweedFs;

#[tokio::test]
async fn weed_given_a_taken_port_still_comes_up_and_stays_up() {
    // The tenth port asked for (s3.port.lance, the listener CI saw fail)
    // is one this test holds, on the first start only. weed either moves
    // that listener to a free port itself or exits and is started again on
    // fresh ports (`attempts`); either way it must serve and stay up.
    let held = std::net::TcpListener::bind(("127.0.0.1", loopback_port())).unwrap();
    let held_port = held.local_addr().unwrap().port();
    let mut asked = 0;
    let mut ports = || {
        asked += 1;
        if asked == 10 {
            held_port
        } else {
            loopback_port()
        }
    };
    let Some(mut weed) = SeaweedFs::start_on(&mut ports).await else {
        return;
    };
    assert!(asked >= 12, "every listener got a port");
    weed.create_bucket("after-the-race", false).await;
    // The listener started last must not have died after the S3 API came
    // up (what CI saw): a second bucket after every listener has started.
    assert!(weed.is_running(), "{}", weed.log());
    weed.create_bucket("still-up", false).await;
    assert!(
        weed.is_running(),
        "attempts {}: {}",
        weed.attempts(),
        weed.log()
    );
    drop(held);
}
