//! Errors about files that may hold secrets (the config file's `auth.client_secret`, the static
//! tokens file), told by place and never by content.
//!
//! Why: these errors go to the log, and the static tokens file's also to the unauthenticated
//! `/status`. Parsers quote what they choke on (TOML's display even prints the whole offending
//! line), and an operator may paste a raw secret anywhere in such a file, under a wrong name
//! too. So an error names the line and column and what was expected; every double-quoted value
//! in it is replaced by `"…"`, and so is the name of an unknown field (a token pasted as a
//! key). The names the parser expected, quoted with backticks, stay.

/// A TOML parse error of `text`: where, and the parser's message without values.
pub(crate) fn toml(text: &str, error: &toml::de::Error) -> String {
    let message = without_quoted_values(error.message());
    match error.span() {
        Some(span) => {
            let (line, column) = line_and_column(text, span.start);
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// `message` with every double-quoted value replaced by `"…"` (a quote escaped inside one, as
/// serde prints it, does not end it), and the name of an unknown field or variant, which is
/// what the file holds too, replaced by `` `…` ``.
pub(crate) fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    let mut escaped = false;
    for c in message.chars() {
        if inside {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    out.push_str("…\"");
                    inside = false;
                }
                _ => escaped = false,
            }
        } else {
            out.push(c);
            inside = c == '"';
        }
    }
    if inside {
        out.push('…');
    }
    for named in ["unknown field `", "unknown variant `"] {
        if let Some(start) = out.find(named).map(|at| at + named.len())
            && let Some(length) = out[start..].find('`')
        {
            out.replace_range(start..start + length, "…");
        }
    }
    out
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_count_from_one_and_values_are_dropped() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_and_column("ab", 99), (1, 3));
        assert_eq!(without_quoted_values(r#"a "x" b "y""#), r#"a "…" b "…""#);
        assert_eq!(
            without_quoted_values("expected `token`"),
            "expected `token`"
        );
        assert_eq!(without_quoted_values(r#"unclosed "rest"#), r#"unclosed "…"#);
        assert_eq!(
            without_quoted_values(r#"string "a\"b secret", expected x"#),
            r#"string "…", expected x"#
        );
        assert_eq!(
            without_quoted_values("unknown field `kura_live_1`, expected one of `name`"),
            "unknown field `…`, expected one of `name`"
        );
    }

    #[test]
    fn a_toml_syntax_error_names_the_line_not_its_text() {
        let text = "[auth]\nclient_secret = \"s3cret-value\nmode = \"none\"\n";
        let error = text.parse::<toml::Table>().unwrap_err();
        assert!(error.to_string().contains("s3cret-value"), "toml shows it");
        let told = toml(text, &error);
        assert!(!told.contains("s3cret-value"), "{told}");
        assert!(told.starts_with("line 2, column"), "{told}");
    }
}
