//! Validation of everything a client names: artifact keys, account and project handles, hashes.
//!
//! These checks are what keeps client input away from the filesystem: no key reaches storage
//! unless it passed [`valid_key`], and storage never builds a path from a key anyway.

/// Longest key accepted in a path.
pub const MAX_KEY_LEN: usize = 512;
/// Longest account or project handle.
pub const MAX_HANDLE_LEN: usize = 128;

/// Keys: 1–512 bytes of `[A-Za-z0-9._:+=-]`, and not `.` or `..`.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key != "."
        && key != ".."
        && key.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'+' | b'=' | b'-')
        })
}

/// Handles compare lowercased: returns the lowercased handle when it is 1–128 bytes of
/// `[a-z0-9._-]` (and not `.` or `..`), `None` otherwise.
pub fn normalize_handle(handle: &str) -> Option<String> {
    let lower = handle.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= MAX_HANDLE_LEN
        && lower != "."
        && lower != ".."
        && lower.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    ok.then_some(lower)
}

/// A lowercase hex digest of exactly `len` hex characters.
pub fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a 64-character lowercase hex SHA-256.
pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if !is_lower_hex(text, 64) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn traversal_and_separators_are_not_keys() {
        for bad in [
            "", ".", "..", "a/b", "a\\b", "a\0b", "../etc", "%2e%2e", "a b", "é",
        ] {
            assert!(!valid_key(bad), "{bad:?} must be rejected");
        }
        for good in ["a", "...", "k1", "0123abcdef", "a.b:c+d=e-f_g"] {
            assert!(valid_key(good), "{good:?} must be accepted");
        }
        assert!(valid_key(&"a".repeat(512)));
        assert!(!valid_key(&"a".repeat(513)));
    }

    #[test]
    fn handles_are_lowercased() {
        assert_eq!(normalize_handle("Acme").as_deref(), Some("acme"));
        assert_eq!(normalize_handle("a/b"), None);
        assert_eq!(normalize_handle(".."), None);
        assert_eq!(normalize_handle(&"a".repeat(129)), None);
    }

    proptest! {
        #[test]
        fn accepted_keys_never_carry_path_syntax(key in any::<String>()) {
            if valid_key(&key) {
                prop_assert!(!key.contains('/') && !key.contains('\\') && !key.contains('\0'));
                prop_assert!(key != "." && key != "..");
                prop_assert!(key.len() <= MAX_KEY_LEN);
            }
        }

        #[test]
        fn accepted_handles_are_lowercase_and_safe(handle in any::<String>()) {
            if let Some(h) = normalize_handle(&handle) {
                prop_assert!(!h.contains('/') && h != ".." && h.len() <= MAX_HANDLE_LEN);
                prop_assert_eq!(h.to_ascii_lowercase(), h.clone());
            }
        }

        #[test]
        fn sha256_hex_round_trips(bytes in any::<[u8; 32]>()) {
            prop_assert_eq!(parse_sha256_hex(&hex::encode(bytes)), Some(bytes));
            prop_assert_eq!(parse_sha256_hex(&hex::encode(bytes).to_uppercase()).is_some(), hex::encode(bytes).bytes().all(|b| b.is_ascii_digit()));
        }
    }
}
