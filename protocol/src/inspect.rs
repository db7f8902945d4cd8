//! Read-only views of the few message bodies the gateway looks into.

/// Severity and SQLSTATE of an ErrorResponse or NoticeResponse body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorView<'a> {
    /// Non-localized severity (`V`), else the localized one (`S`).
    pub severity: &'a str,
    /// SQLSTATE (`C`).
    pub code: &'a str,
    /// Primary message (`M`).
    pub message: &'a str,
}

impl<'a> ErrorView<'a> {
    /// Reads the fields of an ErrorResponse/NoticeResponse body; unknown fields are skipped.
    pub fn parse(mut body: &'a [u8]) -> Self {
        let mut view = ErrorView::default();
        let mut localized = "";
        while let Some((&field, rest)) = body.split_first() {
            if field == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let value = std::str::from_utf8(&rest[..end]).unwrap_or("");
            match field {
                b'V' => view.severity = value,
                b'S' => localized = value,
                b'C' => view.code = value,
                b'M' => view.message = value,
                _ => {}
            }
            body = rest.get(end + 1..).unwrap_or(&[]);
        }
        if view.severity.is_empty() {
            view.severity = localized;
        }
        view
    }

    /// Whether the server ends the session with this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity, "FATAL" | "PANIC")
    }
}

/// Name of the first column in a RowDescription body.
pub fn first_field_name(body: &[u8]) -> Option<&str> {
    // int16 column count, then per column a NUL-terminated name and fixed fields.
    let fields = body.get(2..)?;
    if body.get(..2)? == [0, 0] {
        return None;
    }
    let end = fields.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&fields[..end]).ok()
}

/// The first column of a DataRow body (`None`: NULL, or no column).
pub fn first_column(body: &[u8]) -> Option<&[u8]> {
    if body.get(..2)? == [0, 0] {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    body.get(6..6 + usize::try_from(len).ok()?)
}

/// Status byte of a ReadyForQuery body (`I`, `T` or `E`).
pub fn ready_for_query_status(body: &[u8]) -> Option<u8> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Some(*s),
        _ => None,
    }
}

/// Process ID and 4-byte secret of a BackendKeyData body (protocol 3.0).
pub fn backend_key_data(body: &[u8]) -> Option<(i32, i32)> {
    let pid = body.first_chunk::<4>()?;
    let secret = <[u8; 4]>::try_from(body.get(4..)?).ok()?;
    Some((i32::from_be_bytes(*pid), i32::from_be_bytes(secret)))
}

/// Name and value of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_field_name_of_row_descriptions() {
        let mut body = vec![0, 2];
        body.extend_from_slice(b"understudy_xid\0");
        body.extend_from_slice(&[0; 18]);
        assert_eq!(first_field_name(&body), Some("understudy_xid"));
        assert_eq!(first_field_name(&[0, 0]), None);
        assert_eq!(first_field_name(&[0, 1, b'a']), None);
        assert_eq!(first_field_name(&[0]), None);
    }

    #[test]
    fn error_view_reads_fields() {
        let v = ErrorView::parse(b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0");
        assert_eq!(v.code, "57P01");
        assert!(v.is_fatal());
        assert_eq!(v.message, "terminating connection");
        let localized = ErrorView::parse(b"SERREUR\0C42601\0");
        assert_eq!(localized.severity, "ERREUR");
        assert_eq!(
            ErrorView::parse(b"C4"),
            ErrorView {
                code: "4",
                ..Default::default()
            }
        );
    }

    #[test]
    fn small_views() {
        assert_eq!(ready_for_query_status(b"T"), Some(b'T'));
        assert_eq!(ready_for_query_status(b"TT"), None);
        assert_eq!(backend_key_data(b"\0\0\0\x01\0\0\0\x02"), Some((1, 2)));
        assert_eq!(backend_key_data(b"\0\0\0\x01\0\0"), None);
        assert_eq!(
            parameter_status(b"TimeZone\0UTC\0"),
            Some(("TimeZone", "UTC"))
        );
    }
}
