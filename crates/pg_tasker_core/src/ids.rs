//! Identifiers in text form.

/// The bytes of a UUID written as 32 hex digits (any case), with or without
/// a hyphen after the 8th, 12th, 16th and 20th digit (the canonical form and
/// the compact one); `None` for anything else (braces, URNs, stray
/// hyphens, other lengths).
pub fn uuid_from_text(text: &str) -> Option<[u8; 16]> {
    let mut bytes = [0u8; 16];
    let mut digits = 0usize;
    let mut last_was_hyphen = false;
    for c in text.bytes() {
        if c == b'-' {
            // one hyphen, and only where the canonical form has one
            if last_was_hyphen || ![8, 12, 16, 20].contains(&digits) {
                return None;
            }
            last_was_hyphen = true;
            continue;
        }
        let v = (c as char).to_digit(16)? as u8;
        if digits == 32 {
            return None;
        }
        bytes[digits / 2] |= if digits.is_multiple_of(2) { v << 4 } else { v };
        digits += 1;
        last_was_hyphen = false;
    }
    (digits == 32 && !last_was_hyphen).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::uuid_from_text;

    const CANONICAL: &str = "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f";

    fn hex(b: [u8; 16]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn canonical_compact_mixed_case_and_partial_hyphens_are_read() {
        let want = "0190e8b45c2e7f6a9d3e1a2b3c4d5e6f";
        for text in [
            CANONICAL,
            want,
            "0190E8B4-5C2E-7F6A-9D3E-1A2B3C4D5E6F",
            "0190e8b45c2e-7f6a9d3e-1a2b3c4d5e6f",
            "0190e8b4-5c2e7f6a9d3e1a2b3c4d5e6f",
        ] {
            assert_eq!(
                uuid_from_text(text).map(hex).as_deref(),
                Some(want),
                "{text}"
            );
        }
    }

    #[test]
    fn anything_else_is_not_a_uuid() {
        for text in [
            "",
            "-",
            "0190e8b4",
            "{0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f}",
            "urn:uuid:0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f",
            "0190e8b4--5c2e-7f6a-9d3e-1a2b3c4d5e6f",
            "-0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f",
            "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f-",
            "0190e8b-45c2e-7f6a-9d3e-1a2b3c4d5e6f",
            "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f0",
            "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6",
            "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6g",
            " 0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5e6f",
            "0190e8b4-5c2e-7f6a-9d3e-1a2b3c4d5é",
        ] {
            assert_eq!(uuid_from_text(text), None, "{text}");
        }
    }
}
