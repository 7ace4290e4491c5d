//! The "nodes" and "shared secrets" groups: what the nodes of one service share.

use super::*;

pub(super) async fn ping_answers(s: S) {
    s.ping().await.unwrap();
}

pub(super) async fn bans_keep_the_later_end_and_expire(s: S) {
    let now = Utc::now();
    let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let ban = |until, node: &str| Ban {
        ip,
        until,
        reason: "login failures".into(),
        node: node.into(),
    };
    s.put_ban(&ban(now + Duration::seconds(60), "a"))
        .await
        .unwrap();
    // A shorter ban from another node does not cut the running one short.
    s.put_ban(&ban(now + Duration::seconds(10), "b"))
        .await
        .unwrap();
    let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
    s.put_ban(&Ban {
        ip: v6,
        until: now + Duration::seconds(5),
        reason: "protocol errors".into(),
        node: "b".into(),
    })
    .await
    .unwrap();
    let mut bans = s.active_bans(now).await.unwrap();
    bans.sort_by_key(|b| b.ip);
    assert_eq!(bans.len(), 2, "{bans:?}");
    assert_eq!(bans[0].ip, ip);
    assert_eq!(bans[0].node, "a");
    assert_eq!(
        bans[0].until.timestamp_micros(),
        (now + Duration::seconds(60)).timestamp_micros()
    );
    assert_eq!(bans[1].ip, v6);
    assert_eq!(bans[1].reason, "protocol errors");
    // A longer one extends it.
    s.put_ban(&ban(now + Duration::seconds(120), "b"))
        .await
        .unwrap();
    let bans = s.active_bans(now).await.unwrap();
    let b = bans.iter().find(|b| b.ip == ip).unwrap();
    assert_eq!(b.node, "b");
    // Later, only what still runs.
    let later = s.active_bans(now + Duration::seconds(30)).await.unwrap();
    assert_eq!(later.iter().map(|b| b.ip).collect::<Vec<_>>(), [ip]);
    assert!(s
        .active_bans(now + Duration::seconds(200))
        .await
        .unwrap()
        .is_empty());
}

pub(super) async fn shared_secrets_first_writer_wins_and_rotations_count(s: S) {
    assert_eq!(s.shared_secret_get("k").await.unwrap(), None);
    let a = s.shared_secret_init("k", "from-a").await.unwrap();
    assert_eq!(
        a,
        SharedSecret {
            value: "from-a".into(),
            version: 1
        }
    );
    // A second node starting later reads the winner.
    let b = s.shared_secret_init("k", "from-b").await.unwrap();
    assert_eq!(b, a);
    let r = s.shared_secret_replace("k", 1, "rotated").await.unwrap();
    assert_eq!(
        r,
        Some(SharedSecret {
            value: "rotated".into(),
            version: 2
        })
    );
    // A second rotation made from the same old version loses: nothing is overwritten.
    assert_eq!(
        s.shared_secret_replace("k", 1, "stale").await.unwrap(),
        None
    );
    assert_eq!(s.shared_secret_get("k").await.unwrap(), r);
    // Nothing to replace: no value appears.
    assert_eq!(s.shared_secret_replace("new", 0, "v").await.unwrap(), None);
    assert_eq!(s.shared_secret_get("new").await.unwrap(), None);
}
