//! Validation of names that come from requests and end up in file paths,
//! export names or SQL rows.
//!
//! Allowed: ASCII letters, digits, `.`, `_`, `-`; 1..=128 bytes; not
//! starting with `.` (no hidden files, no `.`/`..`). That keeps every name
//! a single safe path component and a valid NBD export name.

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 128;

/// Longest accepted backup id (ids embed the VM name).
pub const MAX_ID_LEN: usize = 200;

/// Check a name (`what` describes it in the error).
pub fn validate(what: &str, value: &str) -> Result<(), String> {
    validate_len(what, value, MAX_NAME_LEN)
}

/// Check a backup id from a request path.
pub fn validate_id(value: &str) -> Result<(), String> {
    validate_len("backup id", value, MAX_ID_LEN)
}

fn validate_len(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > max {
        return Err(format!("{what} longer than {max} bytes"));
    }
    if value.starts_with('.') {
        return Err(format!("{what} must not start with '.'"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["vm1", "db-server_01", "Prod.VM-7", "a"] {
            assert!(validate("vm_name", n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_traversal_and_separators() {
        for n in [
            "",
            "..",
            ".",
            "../etc",
            "a/b",
            "a\\b",
            ".hidden",
            "vm\0",
            "vm name",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate("vm_name", n).is_err(), "{n:?}");
        }
    }
}
