//! Rules for the names, ids, path templates and URLs an org's settings hold (checked the
//! same way from the API, the config file and the demo).

pub const DEFAULT_PATH_TEMPLATE: &str = "/{type}/{date}/{timestamp}_{id}.json";

pub const MAX_NAME_LEN: usize = 64;

/// Org, user and webhook names end up in paths and logs: a safe charset only.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("{name:?} must be 1 to {MAX_NAME_LEN} characters"));
    }
    let b = name.as_bytes();
    if !b[0].is_ascii_alphanumeric() {
        return Err(format!("{name:?} must start with a letter or digit"));
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "{name:?} may contain only lowercase letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

const TEMPLATE_VARS: [&str; 5] = ["{type}", "{date}", "{timestamp}", "{id}", "{org}"];

/// A path template must stay inside the org folder and keep one file per event id, and
/// (rendered for `org`) never put a file under the roll-up tree.
pub fn validate_path_template(t: &str, org: &str) -> Result<(), String> {
    if !t.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if !t.contains("{id}") {
        return Err("must contain {id} so that every event gets its own file".into());
    }
    if !t.ends_with(".json") {
        return Err("must end with \".json\"".into());
    }
    // The roll-up tree is hookbridge's own output, rebuilt whole by a replay: per-event
    // files there would be deleted with it (SFTP users cannot write there either). The
    // first folder must not be it, literally or once rendered: `{org}` for an org named
    // "rollups", or `{id}` for an event of that id (the platform picks ids). {date} and
    // {timestamp} always render digits, which "rollups" has none of; {type} is a closed
    // set and {org} is known here; {id} may be any text.
    let rollups = crate::storage::complete_view::ROLLUP_DIR;
    let first = t[1..].split('/').next().unwrap_or_default();
    if !first.contains("{date}") && !first.contains("{timestamp}") {
        let with_org = first.replace("{org}", org);
        if crate::event::EventType::ALL.iter().any(|k| {
            let pattern = with_org.replace("{type}", k.as_str()).replace("{id}", "*");
            glob_matches(&pattern, rollups)
        }) {
            return Err(if first == rollups {
                format!("must not start with /{rollups}/, the roll-up folders hookbridge writes")
            } else {
                format!(
                    "its first folder can render as /{rollups}/ (the roll-up folders hookbridge writes) for org {org:?}{}",
                    if first.contains("{id}") { " or for some event id" } else { "" }
                )
            });
        }
    }
    let mut rest = t.to_owned();
    for v in TEMPLATE_VARS {
        rest = rest.replace(v, "x");
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "unknown placeholder; allowed: {}",
            TEMPLATE_VARS.join(" ")
        ));
    }
    for seg in rest[1..].split('/') {
        if seg.is_empty() || seg == "." || seg == ".." || seg.starts_with('.') {
            return Err("path segments must be non-empty and must not start with '.'".into());
        }
        if !seg
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        {
            return Err(
                "may contain only letters, digits, '_', '-', '.', '/' and placeholders".into(),
            );
        }
    }
    Ok(())
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (a
/// template's literals never hold `*`).
fn glob_matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(after) = text.strip_prefix(head) else {
                return false;
            };
            (0..=after.len()).any(|i| after.is_char_boundary(i) && glob_matches(rest, &after[i..]))
        }
    }
}

pub fn render_path_template(t: &str, env: &crate::event::Envelope) -> String {
    t.replace("{type}", env.kind.as_str())
        .replace("{date}", &env.timestamp.format("%Y-%m-%d").to_string())
        .replace("{timestamp}", &env.file_stamp())
        .replace("{id}", &env.id)
        .replace("{org}", &env.org)
}

pub fn validate_url(u: &str) -> Result<url::Url, String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("{u:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{u:?}: only http and https URLs are allowed"));
    }
    if parsed.host_str().is_none_or(|h| h.is_empty()) {
        return Err(format!("{u:?} has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!("{u:?}: credentials in the URL are not allowed"));
    }
    Ok(parsed)
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("acme").is_ok());
        assert!(validate_name("acme-2.eu_x").is_ok());
        for bad in ["", ".", "..", "-x", "Acme", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn templates() {
        assert!(validate_path_template(DEFAULT_PATH_TEMPLATE, "rollups").is_ok());
        assert!(validate_path_template("/out/{org}-{id}.json", "acme").is_ok());
        assert!(validate_path_template("/rollups-copy/{id}.json", "acme").is_ok());
        assert!(validate_path_template("/{org}/{id}.json", "acme").is_ok());
        assert!(validate_path_template("/{org}-{id}.json", "rollups").is_ok());
        // Rendered for this org, the first folder would be the roll-up tree.
        assert!(validate_path_template("/{org}/{id}.json", "rollups").is_err());
        assert!(validate_path_template("/roll{org}/{id}.json", "ups").is_err());
        // The platform picks event ids: "rollups" is one.
        assert!(validate_path_template("/{id}/{id}.json", "acme").is_err());
        assert!(validate_path_template("/roll{id}/a{id}.json", "acme").is_err());
        assert!(validate_path_template("/r{id}s/{id}.json", "acme").is_err());
        assert!(validate_path_template("/x{id}/{id}.json", "acme").is_ok());
        assert!(validate_path_template("/{id}-{date}/{id}.json", "acme").is_ok());
        assert!(validate_path_template("/{type}/{id}.json", "rollups").is_ok());
        for bad in [
            "{id}.json",
            "/../{id}.json",
            "/a//{id}.json",
            "/{x}/{id}.json",
            "/a/b.json",
            "/.hidden/{id}.json",
            "/rollups/{type}/{id}.json",
        ] {
            assert!(validate_path_template(bad, "acme").is_err(), "{bad}");
        }
    }
}
