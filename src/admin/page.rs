//! The status page: one self-contained HTML document (inline CSS and script, no external
//! assets) that polls `/api/v1/status`, computes rates between polls, and offers
//! drain/maint/ready buttons that call the admin API (with the token, when one is needed).

pub const HTML: &str = include_str!("page.html");
