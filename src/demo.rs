//! `serve --demo`: an org `acme` with an SFTP user (fresh password, printed) and an `sftp`
//! hook for all eight event types, so a newcomer can post an event and fetch the file.

use crate::event::EventType;
use crate::store::{SftpUser, Webhook, WebhookKind};
use crate::App;

pub const DEMO_ORG: &str = "acme";
pub const DEMO_USER: &str = "acme";

pub async fn setup(app: &App) -> Result<String, String> {
    let store = &app.store;
    store
        .put_org(DEMO_ORG, "Acme (demo)")
        .await
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(app.layout.org_dir(DEMO_ORG)).map_err(|e| e.to_string())?;
    let password = crate::secrets::random_token(12);
    let p = password.clone();
    let hash = tokio::task::spawn_blocking(move || crate::auth::hash_password(&p))
        .await
        .map_err(|e| e.to_string())??;
    let existing_keys = store
        .get_sftp_user(DEMO_USER)
        .await
        .ok()
        .flatten()
        .map(|u| u.public_keys)
        .unwrap_or_default();
    store
        .put_sftp_user(&SftpUser {
            org: DEMO_ORG.into(),
            name: DEMO_USER.into(),
            has_password: true,
            password_hash: Some(hash),
            public_keys: existing_keys,
            upload: false,
        })
        .await
        .map_err(|e| e.to_string())?;
    if store
        .get_webhook(DEMO_ORG, "acme-files")
        .await
        .map_err(|e| e.to_string())?
        .is_none()
    {
        store
            .put_webhook(&Webhook {
                id: "acme-files".into(),
                org: DEMO_ORG.into(),
                kind: WebhookKind::Sftp,
                url: None,
                events: EventType::ALL.to_vec(),
                path_template: None,
                secret: None,
                enabled: true,
                disabled_reason: None,
                created_at: chrono::Utc::now(),
                failing_since: None,
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(password)
}
