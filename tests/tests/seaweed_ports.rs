//! The S3 test server survives losing a port race: CI once saw `weed mini`
//! die because a port it was given was taken before it bound it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use integration_tests::ports::loopback_port;
use integration_tests::seaweed::SeaweedFs;

#[tokio::test]
async fn weed_started_on_a_taken_port_is_started_again_on_fresh_ones() {
    // The tenth port asked for (s3.port.lance, the listener CI saw fail)
    // is one this test holds, on the first start only.
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
    let Some(weed) = SeaweedFs::start_on(&mut ports).await else {
        return;
    };
    assert_eq!(weed.attempts(), 2, "{}", weed.log());
    weed.create_bucket("after-the-race", false).await;
    drop(held);
}
