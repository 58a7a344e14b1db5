//! The `Range` header subset http-api.md asks for: one `bytes=a-`, `bytes=a-b` or `bytes=-n`.

/// What to send for a `Range` header, given the artifact's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Send the whole body with 200 (no header, several ranges, or one that does not parse).
    Full,
    /// Send `[start, end)` with 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */<size>`.
    Unsatisfiable,
}

pub fn answer(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |text: &str| -> Option<u64> {
        let text = text.trim();
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match number(last) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: size.saturating_sub(n),
                end: size,
            },
            None => RangeAnswer::Full,
        },
        // bytes=a-
        (false, true) => match number(first) {
            Some(start) if start >= size => RangeAnswer::Unsatisfiable,
            Some(start) => RangeAnswer::Partial { start, end: size },
            None => RangeAnswer::Full,
        },
        // bytes=a-b
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(last)) if last >= start => {
                if start >= size {
                    RangeAnswer::Unsatisfiable
                } else {
                    RangeAnswer::Partial {
                        start,
                        end: last.saturating_add(1).min(size),
                    }
                }
            }
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_forms_of_the_spec() {
        assert_eq!(answer(None, 10), RangeAnswer::Full);
        assert_eq!(
            answer(Some("bytes=2-"), 10),
            RangeAnswer::Partial { start: 2, end: 10 }
        );
        assert_eq!(
            answer(Some("bytes=2-4"), 10),
            RangeAnswer::Partial { start: 2, end: 5 }
        );
        assert_eq!(
            answer(Some("bytes=2-400"), 10),
            RangeAnswer::Partial { start: 2, end: 10 }
        );
        assert_eq!(
            answer(Some("bytes=-3"), 10),
            RangeAnswer::Partial { start: 7, end: 10 }
        );
        assert_eq!(answer(Some("bytes=10-"), 10), RangeAnswer::Unsatisfiable);
        assert_eq!(answer(Some("bytes=0-"), 0), RangeAnswer::Unsatisfiable);
        assert_eq!(answer(Some("bytes=0-1,3-4"), 10), RangeAnswer::Full);
        assert_eq!(answer(Some("bytes=4-2"), 10), RangeAnswer::Full);
        assert_eq!(answer(Some("items=0-1"), 10), RangeAnswer::Full);
        assert_eq!(answer(Some("bytes=x-1"), 10), RangeAnswer::Full);
        assert_eq!(answer(Some("bytes=+1-2"), 10), RangeAnswer::Full);
    }

    proptest! {
        #[test]
        fn partial_answers_always_fit_the_body(header in ".{0,40}", size in 0u64..10_000) {
            if let RangeAnswer::Partial { start, end } = answer(Some(&header), size) {
                prop_assert!(start < end && end <= size);
            }
        }

        #[test]
        fn well_formed_ranges_are_honoured(size in 1u64..10_000, a in 0u64..20_000, len in 0u64..20_000) {
            let header = format!("bytes={}-{}", a, a + len);
            let got = answer(Some(&header), size);
            if a >= size {
                prop_assert_eq!(got, RangeAnswer::Unsatisfiable);
            } else {
                prop_assert_eq!(got, RangeAnswer::Partial { start: a, end: (a + len + 1).min(size) });
            }
        }
    }
}
