//! The path an authorization decision is made on, and the one the application then gets:
//! the request's path normalised as Envoy's `normalize_path` and `merge_slashes` do, so that
//! `//admin`, `/%61dmin`, `/./admin` and `/api/../admin` are all `/admin` to a policy and to
//! the application alike. Steps: percent-escapes of unreserved characters are decoded (RFC
//! 3986 §2.3) and the others written in upper case (§6.2.2.1); runs of slashes are merged;
//! dot segments are removed (§5.2.4). An encoded `/` or `\`, a raw `\`, a malformed escape
//! or a dot segment with parameters (`..;`, which Tomcat reads as `..`) is refused: each
//! means something else to some server than to the policy.

/// Why a path is refused (400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("an encoded slash or backslash (%2F, %5C) in the path is refused")]
    EncodedSeparator,
    #[error("a backslash in the path is refused")]
    Backslash,
    #[error("a malformed percent-escape in the path")]
    BadEscape,
    #[error("a dot segment with parameters (..; or .;) in the path is refused")]
    DotSegmentParameters,
}

/// The normalised form of `path` (the path only, no query). A path that does not start with
/// `/` (`*` of `OPTIONS *`) is returned as it is.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Ok(path.to_owned());
    }
    let decoded = decode_unreserved(path)?;
    let trailing_slash = decoded.ends_with('/');
    let mut segments: Vec<&str> = Vec::new();
    let mut ends_in_directory = trailing_slash;
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        ends_in_directory = trailing_slash;
        match segment {
            "." => ends_in_directory = true,
            ".." => {
                segments.pop();
                ends_in_directory = true;
            }
            s if s.starts_with("..;") || s.starts_with(".;") => {
                return Err(PathError::DotSegmentParameters);
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if ends_in_directory || segments.is_empty() {
        normalized.push('/');
    }
    Ok(normalized)
}

/// Decodes `%XX` of unreserved characters, upper-cases the hex of the others, and refuses
/// encoded separators, raw backslashes and malformed escapes.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
                let value = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(PathError::BadEscape)?;
                match value {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    v if is_unreserved(v) => out.push(v),
                    v => out.extend_from_slice(format!("%{v:02X}").as_bytes()),
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    // Only ASCII was replaced, so valid UTF-8 stays valid.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evasions_of_a_policy_on_admin_all_become_admin() {
        for evasion in [
            "/admin",
            "//admin",
            "///admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "/./admin",
            "/api/../admin",
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/.%2E/admin",
            "/a/b/../../admin",
            "/../admin",
            "/../../admin",
        ] {
            assert_eq!(normalize(evasion).as_deref(), Ok("/admin"), "{evasion}");
        }
    }

    #[test]
    fn trailing_slashes_and_directories_are_kept() {
        assert_eq!(normalize("/").as_deref(), Ok("/"));
        assert_eq!(normalize("//").as_deref(), Ok("/"));
        assert_eq!(normalize("/admin/").as_deref(), Ok("/admin/"));
        assert_eq!(normalize("/admin//").as_deref(), Ok("/admin/"));
        assert_eq!(normalize("/admin/.").as_deref(), Ok("/admin/"));
        assert_eq!(normalize("/admin/x/..").as_deref(), Ok("/admin/"));
        assert_eq!(normalize("/..").as_deref(), Ok("/"));
        assert_eq!(normalize("/a/./b/../c").as_deref(), Ok("/a/c"));
    }

    #[test]
    fn other_escapes_stay_encoded_in_upper_case() {
        assert_eq!(normalize("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(normalize("/a%3ab").as_deref(), Ok("/a%3Ab"));
        assert_eq!(normalize("/%7Euser").as_deref(), Ok("/~user"));
        assert_eq!(normalize("/caf%C3%A9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(normalize("/a;b/c").as_deref(), Ok("/a;b/c"));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (path, error) in [
            ("/public%2F..%2Fadmin", PathError::EncodedSeparator),
            ("/public%2f..%2fadmin", PathError::EncodedSeparator),
            ("/public%5C..%5Cadmin", PathError::EncodedSeparator),
            ("/public\\..\\admin", PathError::Backslash),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/public/..;/admin", PathError::DotSegmentParameters),
            ("/public/.;x/admin", PathError::DotSegmentParameters),
        ] {
            assert_eq!(normalize(path), Err(error), "{path}");
        }
    }

    #[test]
    fn paths_that_are_not_absolute_are_left_alone() {
        assert_eq!(normalize("*").as_deref(), Ok("*"));
        assert_eq!(normalize("").as_deref(), Ok(""));
    }
}
