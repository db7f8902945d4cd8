//! md5 password authentication helpers.
//!
//! PostgreSQL stores `"md5" + hex(md5(password + user))` and, for AuthenticationMD5Password with a
//! 4-byte salt, expects `"md5" + hex(md5(hex(md5(password + user)) + salt))`. The stored hash is
//! therefore enough to log in, which is what lets the gateway re-login from an auth file or
//! `auth_query` result without the password (`src/backend/libpq/crypt.c`).

use std::fmt::Write as _;

use md5::{Digest, Md5};

/// Hex digits in an md5 hash (`MD5_PASSWD_LEN` minus the `"md5"` prefix).
const MD5_HEX_LEN: usize = 32;

/// The string is not an md5 password hash as PostgreSQL stores it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an md5 password hash (\"md5\" followed by 32 lowercase hex digits)")]
pub struct InvalidMd5Verifier;

/// Whether `secret` is an md5 hash as PostgreSQL stores it (its `get_password_type` check).
pub fn is_md5_verifier(secret: &str) -> bool {
    verifier_hex(secret).is_some()
}

/// The hash PostgreSQL stores for an md5 password: `"md5" + hex(md5(password + user))`.
pub fn md5_verifier(password: &[u8], user: &[u8]) -> String {
    format!("md5{}", hex_md5(&[password, user]))
}

/// The PasswordMessage answer to AuthenticationMD5Password, computed from the stored hash.
pub fn md5_response_from_verifier(
    verifier: &str,
    salt: [u8; 4],
) -> Result<String, InvalidMd5Verifier> {
    let hex = verifier_hex(verifier).ok_or(InvalidMd5Verifier)?;
    Ok(format!("md5{}", hex_md5(&[hex.as_bytes(), &salt])))
}

/// The PasswordMessage answer to AuthenticationMD5Password, computed from the password.
pub fn md5_response_from_password(password: &[u8], user: &[u8], salt: [u8; 4]) -> String {
    let hex = hex_md5(&[password, user]);
    format!("md5{}", hex_md5(&[hex.as_bytes(), &salt]))
}

/// The 32 lowercase hex digits after `"md5"`, if `secret` is an md5 hash.
fn verifier_hex(secret: &str) -> Option<&str> {
    secret.strip_prefix("md5").filter(|hex| {
        hex.len() == MD5_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut md5 = Md5::new();
    for part in parts {
        md5.update(part);
    }
    let mut hex = String::with_capacity(MD5_HEX_LEN);
    for byte in md5.finalize() {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    #[test]
    fn responses_match_postgres_protocol() {
        for (user, password, salt) in [
            (&b"alice"[..], &b"secret"[..], [1, 2, 3, 4]),
            (b"", b"", [0; 4]),
            (b"b\xc3\xb6b", b"p\xe4ss\"word", [0xff, 0, 0x7f, 0x80]),
        ] {
            let expected = md5_hash(user, password, salt);
            assert_eq!(md5_response_from_password(password, user, salt), expected);
            let verifier = md5_verifier(password, user);
            assert_eq!(
                md5_response_from_verifier(&verifier, salt).unwrap(),
                expected
            );
        }
    }

    #[test]
    fn verifier_matches_postgres_protocol() {
        let verifier = md5_verifier(b"secret", b"alice");
        assert_eq!(
            verifier,
            postgres_protocol::password::md5(b"secret", "alice")
        );
        assert!(is_md5_verifier(&verifier));
    }

    #[test]
    fn rejects_what_is_not_an_md5_hash() {
        let good = md5_verifier(b"secret", b"alice");
        for bad in [
            "",
            "md5",
            &good[..34],
            &format!("{good}0"),
            &good.to_uppercase(),
            &good.replace("md5", "MD5"),
            &format!("md5{}", "g".repeat(32)),
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            &format!("md5{}é", "0".repeat(30)),
        ] {
            assert!(!is_md5_verifier(bad), "{bad:?}");
            assert_eq!(
                md5_response_from_verifier(bad, [0; 4]),
                Err(InvalidMd5Verifier)
            );
        }
    }
}
