//! `GET /`: the live dashboard, one self-contained HTML page (inline CSS
//! and JavaScript, `assets/dashboard.html`) that polls the read-only API.
//!
//! The page holds no data, so it is served without authentication (see
//! [`super::auth::ROUTES`]); its requests to the API carry the token the
//! user gives it. Its Content-Security-Policy allows exactly the page's own
//! `<style>` and `<script>` blocks, by SHA-256 hash, and connections to the
//! hub itself: no other script can run in it (injected markup included),
//! and it can load nothing from elsewhere.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;

/// The page, compiled in so the daemon needs no files at run time.
pub const PAGE: &str = include_str!("../../assets/dashboard.html");

/// The text between the first `<tag>` and the following `</tag>`.
fn block<'a>(page: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = page.find(&open)? + open.len();
    let len = page[start..].find(&format!("</{tag}>"))?;
    Some(&page[start..start + len])
}

/// Standard base64 with padding (what CSP hash sources use).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `'sha256-…'` of a block, or `'none'` when the page has no such block
/// (then nothing of that kind may run, rather than anything).
fn hash_source(page: &str, tag: &str) -> String {
    match block(page, tag) {
        Some(text) => {
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            format!("'sha256-{}'", base64(d.as_ref()))
        }
        None => "'none'".to_owned(),
    }
}

/// The policy for `page`.
fn policy(page: &str) -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_source(page, "script"),
        hash_source(page, "style"),
    )
}

/// Computed once: the page cannot change while the daemon runs.
static CSP: LazyLock<String> = LazyLock::new(|| policy(PAGE));

/// `GET /`.
#[utoipa::path(
    get,
    path = "/",
    tag = "ops",
    responses((status = 200, description = "The live dashboard: one self-contained HTML page that polls the read-only API.", content_type = "text/html", body = String))
)]
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The page is small and changes with the daemon's version: always
            // revalidate so an upgrade is seen at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn the_policy_hashes_the_one_script_and_style_of_the_page() {
        // One block of each: a second would be refused by the browser.
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "{tag}");
        }
        // SHA-256 of "alert(1)", known from the CSP specification's tooling.
        let p = policy("<script>alert(1)</script>");
        assert!(
            p.contains("script-src 'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"),
            "{p}"
        );
        assert!(p.contains("style-src 'none'"), "{p}");
        let csp = policy(PAGE);
        assert!(csp.starts_with("default-src 'none';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_parses_no_markup() {
        for banned in [
            "http://",
            "https://",
            "//cdn",
            "src=",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ] {
            assert!(!PAGE.contains(banned), "the page contains {banned:?}");
        }
    }
}
