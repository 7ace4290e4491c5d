//! The page frame, the stylesheet and small form helpers shared by every console page.

use maud::{html, Markup, DOCTYPE};

use crate::ingress::problem::Problem;

/// Served at `/console/static/console.css`: no external fonts, scripts or CDNs.
pub const CSS: &str = r#"
:root{--fg:#1d2330;--muted:#5a6475;--bg:#f5f6f8;--card:#fff;--line:#d9dde4;--acc:#2450b8;--ok:#176b34;--bad:#a4161a;--warn:#8a5a00}
*{box-sizing:border-box}
body{margin:0;font:16px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1d2330;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:.5rem 1.2rem;align-items:center}
header .brand{font-weight:700}
header nav{display:flex;flex-wrap:wrap;gap:.3rem .9rem}
header a{color:#cfe0ff;text-decoration:none;padding:.2rem 0}
header a[aria-current=page]{color:#fff;border-bottom:2px solid #fff}
header form{margin-left:auto}
main{max-width:1100px;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.4rem 0 1rem}
h2{font-size:1.1rem;margin:0 0 .7rem}
section.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:1rem;margin:0 0 1rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.45rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.85rem;color:var(--muted);font-weight:600}
.scroll{overflow-x:auto}
label{display:block;font-weight:600;margin:.6rem 0 .2rem}
label.inline{display:inline-flex;gap:.35rem;align-items:center;font-weight:400;margin:.2rem 1rem .2rem 0}
input[type=text],input[type=url],input[type=password],input[type=datetime-local],select,textarea{width:100%;max-width:36rem;padding:.45rem .5rem;border:1px solid #9aa3b2;border-radius:6px;font:inherit;background:#fff}
textarea{min-height:5rem;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem}
fieldset{border:1px solid var(--line);border-radius:6px;margin:.6rem 0;padding:.4rem .8rem}
legend{font-weight:600}
button{font:inherit;padding:.4rem .9rem;border-radius:6px;border:1px solid var(--acc);background:var(--acc);color:#fff;cursor:pointer}
button.secondary{background:#fff;color:var(--acc)}
button.danger{background:#fff;color:var(--bad);border-color:var(--bad)}
button:focus-visible,a:focus-visible,input:focus-visible,select:focus-visible,textarea:focus-visible{outline:3px solid #ffbf47;outline-offset:1px}
.row-actions{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center}
.row-actions form{display:inline-flex;gap:.3rem;align-items:center;margin:0}
.row-actions select{width:auto}
.error{color:var(--bad);font-weight:600;margin:.25rem 0}
.notice{border-left:4px solid var(--acc);background:#eef3ff;padding:.6rem .8rem;margin:0 0 1rem;border-radius:4px;overflow-wrap:anywhere}
.notice.ok{border-color:var(--ok);background:#edf8f0}
.notice.bad{border-color:var(--bad);background:#fdeeee}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-size:.8rem;font-weight:600;border:1px solid}
.badge.ok{color:var(--ok)}.badge.bad{color:var(--bad)}.badge.warn{color:var(--warn)}.badge.muted{color:var(--muted)}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85rem;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f0f2f5;padding:.4rem;border-radius:4px;margin:.2rem 0}
.muted{color:var(--muted)}
.filters a{margin-right:.8rem}
@media (max-width:640px){
 main{padding:.6rem}
 table.stack,table.stack tbody{display:block;width:100%}
 table.stack thead{display:none}
 table.stack tr{display:block;border-bottom:2px solid var(--line);padding:.4rem 0}
 table.stack td{display:block;border:0;padding:.2rem .3rem;overflow-wrap:anywhere}
 .row-actions form{flex-wrap:wrap}
 table.stack td[data-label]::before{content:attr(data-label) ": ";font-weight:600;color:var(--muted)}
}
"#;

/// Which tab of the org pages is open.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Webhooks,
    Sftp,
    CustomValues,
}

/// The org a page belongs to, with the CSRF token of the session (for the sign-out form).
pub struct Frame<'a> {
    pub org: &'a str,
    pub csrf: &'a str,
    pub tab: Tab,
}

pub fn page(title: &str, frame: Option<Frame<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) " · hookbridge console" }
                link rel="stylesheet" href="/console/static/console.css";
            }
            body {
                header {
                    span.brand { "hookbridge" }
                    @if let Some(f) = &frame {
                        span { "org " strong { (f.org) } }
                        nav aria-label="Console" {
                            (tab(f, Tab::Webhooks, "webhooks", "Webhooks"))
                            (tab(f, Tab::Sftp, "sftp", "SFTP"))
                            (tab(f, Tab::CustomValues, "custom-values", "Custom values"))
                        }
                        form method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(f.csrf);
                            button.secondary type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

fn tab(f: &Frame<'_>, which: Tab, path: &str, label: &str) -> Markup {
    let href = format!("/console/o/{}/{path}", f.org);
    html! {
        @if f.tab == which { a href=(href) aria-current="page" { (label) } }
        @else { a href=(href) { (label) } }
    }
}

pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// An error of one form field, with the API's own `detail` text.
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

/// Which field of a form a problem concerns: the API prefixes field errors with the field
/// (`url: …`, `public_keys[1]: …`); anything else goes to `default`.
pub fn field_error(p: &Problem, fields: &[&str], default: &str) -> FieldError {
    let field = p
        .detail
        .split_once(':')
        .map(|(f, _)| f.split('[').next().unwrap_or(f))
        .filter(|f| fields.contains(f))
        .unwrap_or(default);
    FieldError {
        field: field.to_owned(),
        detail: p.detail.clone(),
    }
}

/// The error message for `field`, placed right after its input, and the id the input
/// names in `aria-describedby`.
pub fn error_for(err: Option<&FieldError>, form: &str, field: &str) -> (Markup, Option<String>) {
    match err.filter(|e| e.field == field) {
        Some(e) => {
            let id = format!("{form}-{field}-error");
            (
                html! { p.error id=(id) role="alert" { (e.detail) } },
                Some(id),
            )
        }
        None => (html! {}, None),
    }
}

/// A notice at the top of a page (or of a row): what an action did.
pub struct Notice {
    pub ok: bool,
    pub text: String,
    /// Shown in monospace after the text (a new secret, a command).
    pub code: Option<String>,
}

impl Notice {
    pub fn ok(text: impl Into<String>) -> Self {
        Notice {
            ok: true,
            text: text.into(),
            code: None,
        }
    }
    pub fn bad(text: impl Into<String>) -> Self {
        Notice {
            ok: false,
            text: text.into(),
            code: None,
        }
    }
    pub fn render(&self) -> Markup {
        let class = if self.ok { "notice ok" } else { "notice bad" };
        html! {
            div class=(class) role="status" {
                (self.text)
                @if let Some(c) = &self.code { " " code.secret { (c) } }
            }
        }
    }
}

/// A message page (sign-in refused, not found, …) with its status code.
pub fn message(title: &str, text: &str) -> Markup {
    page(title, None, html! { section.card { p { (text) } } })
}

/// A page that moves the browser on at once (no script): used after sign-in so that the
/// next request is a same-site navigation that carries the `SameSite=Strict` cookie.
pub fn moving_on(to: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="refresh" content=(format!("0; url={to}"));
                title { "Signed in · hookbridge console" }
                link rel="stylesheet" href="/console/static/console.css";
            }
            body { main { h1 { "Signed in" } p { a href=(to) { "Continue to the console" } } } }
        }
    }
}
