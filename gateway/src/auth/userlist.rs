//! PgBouncer's `auth_file` ("userlist.txt") format, parsed without I/O.
//!
//! One entry a line: `"user" "secret"`, both fields in double quotes, a `"` inside a field
//! written `""`. Blank lines and lines starting with `;` (PgBouncer) or `#` are skipped, and
//! anything after the second field is ignored, as PgBouncer does (`load_auth_file` in
//! `src/loader.c`). Unlike PgBouncer, which logs "broken auth file" and silently keeps the entries
//! read so far, a broken line is an error naming it.

use std::fmt;

use understudy_protocol::md5::is_md5_verifier;
use understudy_protocol::scram::{ScramError, ScramVerifier};
use zeroize::Zeroizing;

/// One `"user" "secret"` line of an auth file.
#[derive(Debug, Clone)]
pub struct UserlistEntry {
    /// The role name.
    pub user: String,
    /// What the file holds for the role.
    pub secret: Secret,
}

/// A secret from an auth file, classified as PostgreSQL classifies `rolpassword`.
#[derive(Clone)]
pub enum Secret {
    /// A SCRAM-SHA-256 verifier (`SCRAM-SHA-256$...`).
    Scram(ScramVerifier),
    /// An md5 hash: `"md5"` and 32 lowercase hex digits.
    Md5(Zeroizing<String>),
    /// Anything else is a plaintext password.
    Plain(Zeroizing<String>),
}

impl Secret {
    /// Classifies a stored secret: SCRAM verifier, md5 hash, or plaintext password.
    pub fn classify(text: Zeroizing<String>) -> Result<Self, ScramError> {
        if text.starts_with("SCRAM-SHA-256$") {
            ScramVerifier::parse(&text).map(Secret::Scram)
        } else if is_md5_verifier(&text) {
            Ok(Secret::Md5(text))
        } else {
            Ok(Secret::Plain(text))
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Scram(verifier) => f.debug_tuple("Scram").field(verifier).finish(),
            Secret::Md5(_) => f.write_str("Md5(..)"),
            Secret::Plain(_) => f.write_str("Plain(..)"),
        }
    }
}

/// Why an auth file could not be parsed; `line` counts from 1.
#[derive(Debug, thiserror::Error)]
pub enum UserlistError {
    /// The line does not have the `"user" "secret"` shape.
    #[error("auth file line {line}: {problem}")]
    Syntax {
        /// The offending line.
        line: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The secret starts with `SCRAM-SHA-256$` but is not a valid verifier.
    #[error("auth file line {line}: user {user:?}: {source}")]
    InvalidScram {
        /// The offending line.
        line: usize,
        /// The user the secret belongs to.
        user: String,
        /// Why the verifier is invalid.
        source: ScramError,
    },
}

/// Parses an auth file; entries come in file order, and for a repeated user the last one wins.
pub fn parse_userlist(text: &str) -> Result<Vec<UserlistEntry>, UserlistError> {
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.trim_start();
        if content.is_empty() || content.starts_with(';') || content.starts_with('#') {
            continue;
        }
        let syntax = |problem| UserlistError::Syntax { line, problem };

        let (mut user, rest) =
            quoted_field(content).ok_or(syntax("expected a quoted user name"))?;
        let separated = rest.trim_start();
        if separated.is_empty() {
            return Err(syntax("expected a quoted password"));
        }
        // Without a gap, `"a""b"` would read as the single field `a"b`.
        if separated.len() == rest.len() {
            return Err(syntax("expected whitespace after the user name"));
        }
        let (secret, _ignored) =
            quoted_field(separated).ok_or(syntax("expected a quoted password"))?;
        if user.is_empty() {
            return Err(syntax("empty user name"));
        }

        let user = std::mem::take(&mut *user);
        let secret = Secret::classify(secret).map_err(|source| UserlistError::InvalidScram {
            line,
            user: user.clone(),
            source,
        })?;
        entries.push(UserlistEntry { user, secret });
    }
    Ok(entries)
}

/// Reads `"..."` (with `""` for a quote) from the start of `text`; returns it and what follows.
fn quoted_field(text: &str) -> Option<(Zeroizing<String>, &str)> {
    let mut rest = text.strip_prefix('"')?;
    // Sized up front so the value is never reallocated, leaving no unzeroized copies behind.
    let mut value = Zeroizing::new(String::with_capacity(rest.len()));
    loop {
        let (chunk, after) = rest.split_once('"')?;
        value.push_str(chunk);
        match after.strip_prefix('"') {
            Some(escaped) => {
                value.push('"');
                rest = escaped;
            }
            None => return Some((value, after)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verifier PostgreSQL stores for the password "pencil" with salt "saltsaltsaltsalt".
    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$\
        Y7KMtnzzL+zDqi0RtBNdAPJekq+PCg4eCcAMKDtLILQ=:c1MMj1kLUJb96FIM7IjzQUXiW2pIi8LDbQl55vL1oRo=";

    fn plain(secret: &Secret) -> &str {
        match secret {
            Secret::Plain(password) => password,
            other => panic!("expected a plain password, got {other:?}"),
        }
    }

    #[test]
    fn classifies_secrets() {
        let md5 = understudy_protocol::md5::md5_verifier(b"secret", b"bob");
        let text = format!(
            "\"alice\" \"{SCRAM}\"\n\"bob\" \"{md5}\"\n\"carol\" \"hunter2\"\n\"dave\" \"{}\"\n",
            md5.to_uppercase()
        );
        let entries = parse_userlist(&text).unwrap();
        let users: Vec<&str> = entries.iter().map(|e| e.user.as_str()).collect();
        assert_eq!(users, ["alice", "bob", "carol", "dave"]);
        let Secret::Scram(verifier) = &entries[0].secret else {
            panic!("expected SCRAM, got {:?}", entries[0].secret);
        };
        assert_eq!(verifier.iterations(), 4096);
        assert_eq!(verifier.salt(), b"saltsaltsaltsalt");
        assert!(matches!(&entries[1].secret, Secret::Md5(hash) if **hash == md5));
        assert_eq!(plain(&entries[2].secret), "hunter2");
        // PostgreSQL only takes lowercase hex as md5; anything else is a password.
        assert_eq!(plain(&entries[3].secret), md5.to_uppercase());
    }

    #[test]
    fn scram_entry_authenticates_its_password() {
        use understudy_protocol::scram::{ScramClient, ScramServer};
        let mut entries = parse_userlist(&format!("\"alice\" \"{SCRAM}\"")).unwrap();
        let Some(UserlistEntry {
            secret: Secret::Scram(verifier),
            ..
        }) = entries.pop()
        else {
            panic!("expected one SCRAM entry");
        };
        let mut server = ScramServer::with_random_nonce(verifier);
        let mut client = ScramClient::with_password(b"pencil");
        let server_first = server.handle_client_first(&client.client_first()).unwrap();
        let client_final = client.handle_server_first(&server_first).unwrap();
        let (server_final, _) = server.handle_client_final(&client_final).unwrap();
        client.handle_server_final(&server_final).unwrap();
    }

    #[test]
    fn skips_comments_and_blank_lines_and_ignores_trailing_text() {
        let text = concat!(
            "; PgBouncer comment\r\n",
            "# also a comment\n",
            "\n",
            "   \n",
            "\t\"a\"\t\"x\" trailing \"junk\"\r\n",
            "  ;\n",
        );
        let entries = parse_userlist(text).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].user, "a");
        assert_eq!(plain(&entries[0].secret), "x");
        assert!(parse_userlist("").unwrap().is_empty());
    }

    #[test]
    fn doubled_quotes_are_quotes() {
        let entries = parse_userlist(r#""we""ird" "pa""ss""""#).unwrap();
        assert_eq!(entries[0].user, r#"we"ird"#);
        assert_eq!(plain(&entries[0].secret), r#"pa"ss""#);
        let entries = parse_userlist(r#""u" """#).unwrap();
        assert_eq!(plain(&entries[0].secret), "");
        let entries = parse_userlist(r#""ü ser" "p;#w d""#).unwrap();
        assert_eq!(entries[0].user, "ü ser");
        assert_eq!(plain(&entries[0].secret), "p;#w d");
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line, problem) in [
            ("alice \"x\"", 1, "expected a quoted user name"),
            ("\n\n\"alice\" x", 3, "expected a quoted password"),
            ("\"a\" \"x\"\n\"alice", 2, "expected a quoted user name"),
            ("\"alice\"", 1, "expected a quoted password"),
            ("\"alice\" \"x", 1, "expected a quoted password"),
            ("\"alice\"\"x\"", 1, "expected a quoted password"),
            (
                "\"alice\"x\"x\"",
                1,
                "expected whitespace after the user name",
            ),
            ("\"\" \"x\"", 1, "empty user name"),
        ] {
            match parse_userlist(text) {
                Err(UserlistError::Syntax {
                    line: l,
                    problem: p,
                }) => {
                    assert_eq!((l, p), (line, problem), "{text:?}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_scram_secret_is_an_error() {
        let text = "\"a\" \"x\"\n\"bob\" \"SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA\"\n";
        match parse_userlist(text) {
            Err(UserlistError::InvalidScram { line, user, .. }) => {
                assert_eq!((line, user.as_str()), (2, "bob"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let text = "\"a\" \"hunter2\"\n\"b\" \"md5a3556571e93b0d20722ba62be61e8c2d\"";
        let entries = parse_userlist(text).unwrap();
        let shown = format!("{entries:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("a3556571"),
            "{shown}"
        );
    }
}
