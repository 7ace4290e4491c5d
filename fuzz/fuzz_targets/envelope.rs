//! Any body posted to `/v1/orgs/{org}/events`: parsing never panics, and whatever it
//! accepts serializes to JSON that parses back to the same envelope.
#![no_main]

use hookbridge::event::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    if let Ok(env) = Envelope::from_request(body, "acme", now) {
        let json = env.to_json();
        let again = Envelope::from_request(json.as_bytes(), "acme", now).expect("own output parses");
        assert_eq!(again.to_json(), json);
        assert!(hookbridge::event::validate_event_id(&env.id).is_ok());
        assert!(!env.file_stamp().contains('/'));
    }
});
