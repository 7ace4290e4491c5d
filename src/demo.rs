//! `serve --demo`: an org `acme` with an SFTP user (fresh password, printed) and an `sftp`
//! hook for all eight event types, so a newcomer can post an event and fetch the file.
//! Made through [`crate::provision`], with the same checks as the admin API.

use crate::provision::{self, HookSpec, UserSpec};
use crate::App;

pub const DEMO_ORG: &str = "acme";
pub const DEMO_USER: &str = "acme";
const DEMO_HOOK: &str = "acme-files";

pub async fn setup(app: &App) -> Result<String, String> {
    let store = &app.store;
    provision::put_org(
        store,
        &*app.storage,
        DEMO_ORG,
        Some("Acme (demo)".into()),
        None,
    )
    .await
    .map_err(|e| e.to_string())?;
    let password = crate::secrets::random_token(12);
    let spec = UserSpec {
        password: Some(password.clone()),
        ..UserSpec::default()
    };
    provision::put_user(store, DEMO_ORG, DEMO_USER, spec)
        .await
        .map_err(|e| e.to_string())?;
    if store
        .get_webhook(DEMO_ORG, DEMO_HOOK)
        .await
        .map_err(|e| e.to_string())?
        .is_none()
    {
        let spec = HookSpec {
            id: Some(DEMO_HOOK.into()),
            kind: "sftp".into(),
            url: None,
            events: vec!["*".into()],
            path_template: None,
            enabled: None,
            format: None,
            rollup: None,
            close_after: None,
            max_part_bytes: None,
        };
        let hook = provision::build_webhook(
            DEMO_ORG,
            spec,
            None,
            app.config.delivery.allow_private_destinations,
        )
        .map_err(|e| e.to_string())?;
        store.put_webhook(&hook).await.map_err(|e| e.to_string())?;
    }
    Ok(password)
}
